"""The bus: FastStream over NATS JetStream (broker, connection and auth) and the plain nats-py client."""
