"""The artifact store (any S3 server through the minio client) and every key a migration uses."""
