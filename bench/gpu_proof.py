"""GPU proof: the vLLM and CUDA paths of the project, run for real on one CUDA GPU (not part of ``make bench``).

Run it whenever a CUDA machine is at hand: ``.venv/bin/python bench/gpu_proof.py``. It

1. installs the ``vllm`` extra when vLLM is not importable (``pip install -e '.[vllm]'``, else ``pip install vllm``);
2. trains a tiny LoRA adapter on SmolLM2-135M (``smollm2-135m`` through ``llamaduo.models.resolve``) with the
   project's trainer (``llamaduo.services.trainer.domain.train``);
3. generates greedy answers with that adapter through the project's two backends on the same prompts:
   ``StudentGenerator`` (transformers, left-padded batches) and ``VLLMGenerator`` (``vllm.LLM`` with a
   ``LoRARequest``); answers equal (target: all), new tokens/s of each (target: vLLM >= 10x transformers);
4. times a 4-bit QLoRA training run through the project's trainer against a bare trl ``SFTTrainer`` +
   bitsandbytes script with the same model, data and settings (target: ours/bare tokens/s >= 0.95);
5. reports peak GPU memory of each part (each part runs in its own process).

Prints ONE JSON line. Exit status: 0 when every path ran (the targets are reported in ``targets``), 1 when a path
did not run (named in ``failed``, its error in ``errors``), 2 at once when there is no CUDA GPU. Budget: under 8
minutes on one GPU (``GPU_PROOF_BUDGET_S``, default 460 s; a part past it is killed and named as failed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
SYSTEM = "You extract invoice fields. Answer with compact JSON only."
ADAPTER_ROWS, PROMPTS, NEW_TOKENS, GEN_BATCH = 64, 256, 80, 64
QLORA_ROWS, QLORA_BATCH, MAX_LENGTH, LR, LORA_R, LORA_ALPHA, SEED = 128, 8, 384, 2e-4, 16, 32, 0
BUDGET_S = float(os.environ.get("GPU_PROOF_BUDGET_S", "460"))


def emit(result: dict[str, Any], code: int) -> None:
    print(json.dumps(result), flush=True)
    sys.exit(code)


def cuda_reason() -> str | None:
    """None when a CUDA GPU is usable, else why not."""
    try:
        import torch
    except Exception as err:
        return f"torch cannot be imported: {err}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False); this proof needs one"
    return None


# ------------------------------------------------------------------------------------------------ parts


def _rows(split: str, n_train: int, n_test: int) -> list[dict[str, str]]:
    from llamaduo.tasks.invoice import make_dataset

    return [r for r in make_dataset(n_train=n_train, n_test=n_test) if r["split"] == split]


def _spec(quantization: str, batch: int) -> Any:
    from llamaduo.contracts.spec import StudentSpec

    return StudentSpec.model_validate({
        "base_model": MODEL, "method": "lora", "quantization": quantization,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.05},
        "training": {"epochs": 1, "learning_rate": LR, "batch_size": batch, "max_length": MAX_LENGTH, "seed": SEED},
        "inference": {"max_new_tokens": NEW_TOKENS, "batch_size": GEN_BATCH, "temperature": 0.0, "backend": "auto"},
    })


def _train_ours(quantization: str, n_rows: int, batch: int, out: Path) -> dict[str, Any]:
    from llamaduo.data.examples import Example
    from llamaduo.services.trainer.domain import train

    examples = [Example(id=r["id"], instruction=r["instruction"], response=r["response"])
                for r in _rows("train", n_rows, 8)[:n_rows]]
    result = train(_spec(quantization, batch), examples, SYSTEM, out)
    return {"tokens_per_s": result.tokens_per_second, "steps": result.steps, "train_loss": result.train_loss,
            "wall_s": result.seconds}


def part_adapter(work: Path) -> dict[str, Any]:
    return _train_ours("none", ADAPTER_ROWS, 8, work / "adapter")


def _prompts() -> list[str]:
    return [r["instruction"] for r in _rows("test", 8, PROMPTS)][:PROMPTS]


def _generate(generator: Any, tokenizer: Any) -> dict[str, Any]:
    prompts = _prompts()
    generator.generate(prompts[:GEN_BATCH], SYSTEM)  # warm-up (kernels, CUDA graphs, caches)
    started = time.perf_counter()
    answers = [a[0] for a in generator.generate(prompts, SYSTEM)]
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds, "answers": answers}


def part_gen_transformers(work: Path) -> dict[str, Any]:
    from llamaduo.services.inference.domain import StudentGenerator

    generator = StudentGenerator.load(_spec("none", 8), work / "adapter")
    return _generate(generator, generator.tokenizer)


def part_gen_vllm(work: Path) -> dict[str, Any]:
    from llamaduo.services.inference.domain import VLLMGenerator

    generator = VLLMGenerator.load(_spec("none", 8), work / "adapter")
    return _generate(generator, generator.tokenizer)


def part_qlora_ours(work: Path) -> dict[str, Any]:
    return _train_ours("4bit", QLORA_ROWS, QLORA_BATCH, work / "qlora")


def part_qlora_bare(work: Path) -> dict[str, Any]:
    """What a user would write with trl + bitsandbytes alone: NF4 double-quantized base, LoRA on all linear
    layers, bf16 compute, gradient checkpointing, the same data, rows, batch, learning rate and schedule."""
    import math

    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from llamaduo.models.resolve import resolve_base_model

    path = resolve_base_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    bf16 = torch.cuda.is_bf16_supported()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in _rows("train", QLORA_ROWS, 8)[:QLORA_ROWS]
    ])
    fields = SFTConfig.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    steps = math.ceil(len(data) / QLORA_BATCH)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, num_train_epochs=1, learning_rate=LR, per_device_train_batch_size=QLORA_BATCH,
            max_length=MAX_LENGTH, warmup_steps=math.ceil(0.1 * steps), lr_scheduler_type="cosine", seed=SEED,
            data_seed=SEED, bf16=bf16, fp16=not bf16, **{checkpointing: True}, report_to="none",
            save_strategy="no", logging_steps=max(1, steps // 20), disable_tqdm=True,
        )
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        output = trainer.train()
    runtime = output.metrics["train_runtime"]
    return {"tokens_per_s": tokens / runtime, "steps": trainer.state.global_step, "train_loss": output.training_loss,
            "step_s": runtime / max(1, trainer.state.global_step)}


PARTS = {"adapter": part_adapter, "gen_transformers": part_gen_transformers, "gen_vllm": part_gen_vllm,
         "qlora_ours": part_qlora_ours, "qlora_bare": part_qlora_bare}


def run_part(name: str, work: Path, deadline: float) -> dict[str, Any]:
    left = deadline - time.monotonic()
    if left < 10:
        raise RuntimeError(f"no time left in the {BUDGET_S:.0f} s budget")
    proc = subprocess.run([sys.executable, __file__, "--part", name, str(work)], capture_output=True, text=True,
                          timeout=left, check=False)
    sys.stderr.write(proc.stderr[-4000:])
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def install_vllm() -> None:
    """Install the ``vllm`` extra (editable project), else the bare package; raise when neither works."""
    if importlib.util.find_spec("vllm") is not None:
        return
    errors = []
    for cmd in ([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[vllm]"],
                [sys.executable, "-m", "pip", "install", "-q", "vllm"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode == 0:
            return
        errors.append(f"{' '.join(cmd[2:])}: {proc.stderr.strip()[-600:]}")
    raise RuntimeError("; ".join(errors))


def main() -> None:
    started = time.monotonic()
    result: dict[str, Any] = {"ok": False, "failed": [], "errors": {}}
    reason = cuda_reason()
    if reason is not None:
        result["failed"], result["errors"] = ["cuda"], {"cuda": reason}
        print(f"gpu_proof: {reason}", file=sys.stderr)
        emit(result, 2)
    import torch

    result["device"] = torch.cuda.get_device_name(0)
    deadline = started + BUDGET_S
    outs: dict[str, dict[str, Any]] = {}

    def attempt(name: str, fn: Any) -> bool:
        try:
            outs[name] = fn()
            return True
        except Exception as err:
            result["failed"].append(name)
            result["errors"][name] = f"{type(err).__name__}: {str(err)[-1500:]}"
            return False

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        attempt("install_vllm", install_vllm)
        if attempt("adapter", lambda: run_part("adapter", work, deadline)):
            attempt("gen_transformers", lambda: run_part("gen_transformers", work, deadline))
            if "install_vllm" not in result["failed"]:
                attempt("gen_vllm", lambda: run_part("gen_vllm", work, deadline))
        attempt("qlora_ours", lambda: run_part("qlora_ours", work, deadline))
        attempt("qlora_bare", lambda: run_part("qlora_bare", work, deadline))
    for name in PARTS:
        if name in ("gen_vllm",) and "install_vllm" in result["failed"]:
            result["failed"].append(name)
            result["errors"][name] = "not run: vLLM could not be installed"
    targets: dict[str, Any] = {}
    hf, vl = outs.get("gen_transformers"), outs.get("gen_vllm")
    if hf and vl:
        same = sum(a == b for a, b in zip(hf["answers"], vl["answers"], strict=True))
        result |= {
            "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, "transformers_batch": GEN_BATCH,
            "greedy_equal": f"{same}/{PROMPTS}",
            "transformers_tokens_per_s": round(hf["tokens_per_s"], 1),
            "vllm_tokens_per_s": round(vl["tokens_per_s"], 1),
            "vllm_vs_transformers": round(vl["tokens_per_s"] / hf["tokens_per_s"], 2),
            "first_difference": next(({"prompt": i, "transformers": a, "vllm": b} for i, (a, b)
                                      in enumerate(zip(hf["answers"], vl["answers"], strict=True)) if a != b), None),
        }
        targets["greedy_answers_equal"] = same == PROMPTS
        targets["vllm_10x_transformers"] = result["vllm_vs_transformers"] >= 10
    ours, bare = outs.get("qlora_ours"), outs.get("qlora_bare")
    if ours and bare:
        result |= {
            "qlora_rows": QLORA_ROWS, "qlora_batch": QLORA_BATCH, "qlora_steps": ours["steps"],
            "qlora_ours_tokens_per_s": round(ours["tokens_per_s"], 1),
            "qlora_bare_tokens_per_s": round(bare["tokens_per_s"], 1), "qlora_bare_step_s": round(bare["step_s"], 4),
            "qlora_ours_vs_bare": round(ours["tokens_per_s"] / bare["tokens_per_s"], 3),
            "qlora_loss_ours": ours["train_loss"], "qlora_loss_bare": bare["train_loss"],
        }
        targets["qlora_ours_vs_bare_ge_0.95"] = result["qlora_ours_vs_bare"] >= 0.95
    result["peak_gpu_mb"] = {k: round(v["peak_gpu_mb"]) for k, v in outs.items()
                             if isinstance(v, dict) and "peak_gpu_mb" in v}
    result["device_used_mb_at_end"] = {k: round(v["device_used_mb"]) for k, v in outs.items()
                                       if isinstance(v, dict) and "device_used_mb" in v}
    result["targets"] = targets
    result["seconds"] = round(time.monotonic() - started, 1)
    result["ok"] = not result["failed"]
    emit(result, 0 if result["ok"] else 1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--part":
        import torch

        torch.cuda.reset_peak_memory_stats()
        figures = PARTS[sys.argv[2]](Path(sys.argv[3]))
        figures["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20  # this process's torch tensors
        free, total = torch.cuda.mem_get_info()  # the whole device (vLLM's engine runs in its own process)
        figures["device_used_mb"] = (total - free) / 2**20
        print(json.dumps(figures))
    else:
        main()
