"""The OpenAI-compatible HTTP serving core shared by `llamaduo serve` and the inference service."""
