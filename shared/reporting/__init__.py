"""What people read: the manifest and report of a migration, its HTML page and charts, the live progress view."""
