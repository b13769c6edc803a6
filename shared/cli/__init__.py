"""The `llamaduo` command line."""
