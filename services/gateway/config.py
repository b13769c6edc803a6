"""The operator's routes file (``llamaduo gateway --routes routes.yaml``): what each route talks to.

Trusted configuration (the operator writes it; nothing on the bus changes it). One route per task alias: the
service LLM it migrates from (``upstream``, any :class:`~llamaduo.contracts.spec.ProviderSpec`), the local
server a promoted student answers from (``local``), whether its traffic is captured, how captured text is
redacted, how a local answer is validated, and how shadow answers are sampled. Which side answers is not here:
that is the route's :class:`~llamaduo.contracts.routes.RouteState`, changed by ``llamaduo promote`` /
``llamaduo rollback`` while the gateway runs. docs/gateway.md documents every field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from llamaduo.contracts.routes import validate_route_name
from llamaduo.contracts.spec import ProviderSpec, StrictModel
from llamaduo.errors import SpecError


class LocalConfig(StrictModel):
    """The local model server of a route (``llamaduo serve`` or vLLM's OpenAI-compatible server)."""

    base_url: str = Field(description="Its OpenAI API address, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(default=None, description="Environment variable holding its API key, if any")
    timeout_seconds: float = Field(default=30.0, gt=0, description="Seconds a local answer may take before "
                                   "the gateway answers from upstream instead (fallback 'timeout')")
    max_concurrency: int = Field(default=8, ge=1, description="Local requests open at once; one more falls "
                                 "back to upstream at once (fallback 'overloaded')")
    load_adapters: bool = Field(default=False, description="When a promoted version's adapter is not served "
                                "yet, download it from S3 into adapters_dir and load it with POST "
                                "/v1/load_lora_adapter (llamaduo serve --adapters-dir, or vLLM with "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING); until then that version falls back "
                                "('unavailable')")
    adapters_dir: str | None = Field(default=None, description="Folder the local server loads adapters from, "
                                     "seen at the same path by the gateway (same host or a shared volume); "
                                     "each version goes to <adapters_dir>/<version>")
    admin_api_key_env: str | None = Field(default=None, description="Environment variable holding the local "
                                          "server's admin key for the adapter endpoints; default: api_key_env's")

    @model_validator(mode="after")
    def _adapters_need_a_folder(self) -> LocalConfig:
        if self.load_adapters and not self.adapters_dir:
            raise ValueError("load_adapters needs adapters_dir: the folder the local server loads adapters from "
                             "(its --adapters-dir)")
        return self


class ValidatorConfig(StrictModel):
    """How a local answer is checked before a client sees it (a failure falls back with reason 'invalid')."""

    json_schema: dict[str, Any] | None = Field(default=None, description="The answer must be JSON valid "
                                               "against this JSON Schema")
    checker: str | None = Field(default=None, description="A built-in check ('json_object', 'non_empty') or "
                                "'module:function' allowed by the plugin rules (docs/oracle.md)")

    @model_validator(mode="after")
    def _exactly_one(self) -> ValidatorConfig:
        if (self.json_schema is None) == (self.checker is None):
            raise ValueError("give exactly one of json_schema or checker")
        return self


class RemigrateConfig(StrictModel):
    spec: str = Field(description="Path of a migration spec template run when the shadow score degrades")


class ShadowConfig(StrictModel):
    """Shadow mode: upstream answers; a sampled share is also asked locally and judged."""

    sample_rate: float = Field(default=0.1, ge=0, le=1, description="Share of requests also asked locally")
    threshold: float = Field(default=70.0, ge=1, le=100, description="Rolling judge score (1..100) below which "
                             "the route is degraded")
    window: int = Field(default=50, ge=1, description="Judged answers in the rolling score")
    judge: ProviderSpec | None = Field(default=None, description="The service LLM that judges shadow answers "
                                       "(as in a spec: api_key_env names its key); default: the route's upstream")
    remigrate: RemigrateConfig | None = None


class CaptureConfig(StrictModel):
    """How captured traffic is batched into S3 objects."""

    batch_rows: int = Field(default=200, ge=1, description="Rows per JSONL object (written when full)")
    batch_seconds: float = Field(default=60.0, gt=0, description="Oldest row's age that writes a batch anyway")


class RouteConfig(StrictModel):
    """One route: the ``model`` name clients send, and what answers it."""

    name: str = Field(description="Route name: the `model` a client sends (letters, digits, '.', '_', '-')")
    upstream: ProviderSpec = Field(description="The service LLM of this task (any provider, as in a spec)")
    local: LocalConfig | None = Field(default=None, description="Where the promoted student is served")
    system_prompt: str = Field(default="", description="Put first when a request has no system message")
    capture: bool = Field(default=True, description="Log each request/response (bus event and S3 JSONL)")
    redact: str | None = Field(default=None, description="Applied to captured text before it is stored or "
                               "published: 'emails_and_numbers' or 'module:function' allowed by the plugin rules")
    validator: ValidatorConfig | None = None
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_route_name(value)


class GatewayConfig(StrictModel):
    """The whole routes file."""

    routes: list[RouteConfig] = Field(min_length=1)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        names = [r.name for r in self.routes]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"route names must be unique; repeated: {', '.join(dupes)}")
        return self

    def route(self, name: str) -> RouteConfig | None:
        return next((r for r in self.routes if r.name == name), None)


def parse_routes(data: Any, where: str = "routes") -> GatewayConfig:
    """Validate a routes mapping; raise :class:`SpecError` naming each wrong field of ``where``."""
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors())
        raise SpecError(f"{where}: {problems} (see docs/gateway.md)") from None


def load_routes(path: str | Path) -> GatewayConfig:
    """Read and validate a routes YAML file; :class:`SpecError` says what is wrong and where."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as err:
        raise SpecError(f"routes file {str(file)!r} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"routes file {str(file)!r} is not valid YAML: {err}") from None
    return parse_routes(data, f"routes file {str(file)!r}")
