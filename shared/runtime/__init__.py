"""Running the system: one service process, the embedded installation, local NATS and S3 servers, logs."""
