"""The one config loader: every service reads ``LLAMADUO_*`` environment variables through :class:`Settings`."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Connection settings shared by the CLI and all services.

    Secrets are ``SecretStr``: they print as ``**********`` in logs, reprs and errors.
    """

    model_config = SettingsConfigDict(env_prefix="LLAMADUO_", extra="ignore")

    # NATS
    nats_url: str = Field(default="nats://127.0.0.1:4222", description="Comma-separated server URLs")
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_creds_file: Path | None = Field(default=None, description="JWT + nkey .creds file")
    nats_nkey_seed_file: Path | None = None
    nats_tls_ca_file: Path | None = None
    nats_tls_cert_file: Path | None = None
    nats_tls_key_file: Path | None = None
    subject_prefix: str = Field(default="", description="Lets several installations share one NATS account")
    nats_replicas: int = Field(
        default=1, ge=1, le=5, description="Replicas of the stream and of every KV bucket the installation "
        "creates: 1 on a single nats-server, 3 on a three-node JetStream cluster (see docs/cluster.md)",
    )

    # S3
    s3_endpoint: str = Field(default="127.0.0.1:9000", description="host:port of any S3 server")
    s3_access_key: SecretStr = SecretStr("llamaduo")
    s3_secret_key: SecretStr = SecretStr("llamaduo-secret")
    s3_secure: bool = False
    s3_region: str | None = Field(default="us-east-1", description="Set explicitly: saves a lookup some servers lack")
    s3_bucket: str = "llamaduo"

    ack_wait_seconds: float | None = Field(
        default=None, gt=0, description="Override every consumer's ack wait (how soon a dead worker's job moves)"
    )

    # Trust: what a spec may name
    allowed_plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Code a spec may name besides the installed 'llamaduo.oracles' / 'llamaduo.checkers' entry "
        "points: comma-separated 'module:attr' refs or module prefixes ('my_tasks' allows my_tasks.*)",
    )
    allowed_dataset_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated key prefixes of the bucket a dataset.source 's3://' may read besides the "
        "migration's own 'migrations/<id>/' (e.g. 'datasets/')",
    )

    # Observability
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of the service's Prometheus /metrics exporter; 0 (the default) serves none",
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the /metrics exporter listens on")

    # Serving: llamaduo serve, the inference service's server, the gateway (see docs/serving.md)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys the OpenAI-compatible servers accept "
        "(none, with no keys file either: no key is asked)",
    )
    api_keys_file: Path | None = Field(default=None, description="File of more bearer keys, one a line")
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Comma-separated keys for loading/unloading adapters at run time "
        "(none: the serving keys)",
    )
    serve_max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest request body (413 beyond)")
    serve_max_total_tokens: int = Field(default=16384, gt=0, description="Cap on max_tokens x n (400 beyond)")
    serve_max_concurrent: int = Field(default=4, gt=0, description="Generations running at once")
    serve_max_waiting: int = Field(default=16, ge=0, description="Generations waiting for a slot (429 beyond)")
    gateway_max_concurrent: int = Field(
        default=256, gt=0, description="Gateway: requests answered at once (it only relays: far above a model's)")
    gateway_max_waiting: int = Field(default=1024, ge=0, description="Gateway: requests waiting (429 beyond)")

    # Local
    work_dir: Path = Field(default=Path(".data/work"), description="Scratch space for models and datasets")
    log_level: str = "INFO"
    service_name: str = "llamaduo"

    @field_validator("subject_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip(".")
        if value and not all(part.replace("-", "").replace("_", "").isalnum() for part in value.split(".")):
            raise ValueError(f"LLAMADUO_SUBJECT_PREFIX {value!r} may hold only letters, digits, '-', '_' and '.'")
        return value

    @field_validator("allowed_plugins", "allowed_dataset_prefixes", "api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @cached_property
    def stream_name(self) -> str:
        if not self.subject_prefix:
            return "LLAMADUO"
        return f"{self.subject_prefix.replace('.', '_').replace('-', '_').upper()}_LLAMADUO"

    @cached_property
    def kv_bucket(self) -> str:
        return f"{self.stream_name}_STATE"

    def subject(self, name: str) -> str:
        return f"{self.subject_prefix}.{name}" if self.subject_prefix else name

    def unprefixed(self, full_subject: str) -> str:
        if self.subject_prefix and full_subject.startswith(self.subject_prefix + "."):
            return full_subject[len(self.subject_prefix) + 1 :]
        return full_subject
