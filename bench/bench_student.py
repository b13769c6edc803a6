"""Student benchmark on SmolLM2-135M (CPU or GPU, whatever torch finds), on the invoice task.

1. Training throughput: our ``train()`` (LoRA) against a bare TRL ``SFTTrainer`` script with the same model,
   data and settings, in tokens per second of training time (non-padding tokens / ``train_runtime``).
2. Inference: ``StudentGenerator`` (left-padded batches) against a plain per-prompt ``model.generate`` loop on
   the same prompts (same model, greedy, same ``max_new_tokens``); speedup in wall time.
3. Peak resident memory of each: every measured part runs in its own subprocess.

Sizes can be changed with environment variables (``BENCH_TRAIN_ROWS``, ``BENCH_PROMPTS``, ``BENCH_NEW_TOKENS``,
``BENCH_BATCH``). Last stdout line: one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning: on a machine shared with other busy processes, spinning
# threads make every torch op many times slower (seen: 160 s instead of 14 s for the same generation).
# Set before torch is imported; the parts' subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODEL = "smollm2-135m"
SYSTEM = "You extract invoice fields. Answer with compact JSON only."
TRAIN_ROWS = int(os.environ.get("BENCH_TRAIN_ROWS", "16"))
PROMPTS = int(os.environ.get("BENCH_PROMPTS", "16"))
NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", "80"))  # the demo spec's max_new_tokens
BATCH = int(os.environ.get("BENCH_BATCH", "16"))
#: Training settings shared by both training parts (our StudentSpec and the bare SFTConfig).
LR, BATCH_TRAIN, MAX_LENGTH, LORA_R, LORA_ALPHA, EPOCHS, SEED = 1e-3, 4, 384, 16, 32, 1, 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rows(split: str, n: int) -> list[dict[str, str]]:
    from llamaduo.tasks.invoice import make_dataset

    return [r for r in make_dataset(n_train=TRAIN_ROWS, n_test=PROMPTS) if r["split"] == split][:n]


# ------------------------------------------------------------------------------------------------ parts


def part_train_ours() -> dict[str, Any]:
    from llamaduo.contracts.spec import StudentSpec
    from llamaduo.data.examples import Example
    from llamaduo.services.trainer.domain import train

    spec = StudentSpec.model_validate({
        "base_model": MODEL, "method": "lora", "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.05},
        "training": {"epochs": EPOCHS, "learning_rate": LR, "batch_size": BATCH_TRAIN, "max_length": MAX_LENGTH,
                     "seed": SEED},
    })
    examples = [Example(id=r["id"], instruction=r["instruction"], response=r["response"])
                for r in rows("train", TRAIN_ROWS)]
    with tempfile.TemporaryDirectory() as out:
        result = train(spec, examples, SYSTEM, Path(out))
    return {"tokens_per_s": result.tokens_per_second, "steps": result.steps, "train_loss": result.train_loss}


def part_train_bare() -> dict[str, Any]:
    """What a user would write with TRL alone (gradient checkpointing off, as ours does on CPU)."""
    import math

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llamaduo.models.resolve import resolve_base_model

    path = resolve_base_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda")
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in rows("train", TRAIN_ROWS)
    ])
    fields = SFTConfig.__dataclass_fields__
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    cuda = torch.cuda.is_available()
    steps = math.ceil(len(data) / BATCH_TRAIN) * EPOCHS
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, num_train_epochs=EPOCHS, learning_rate=LR, per_device_train_batch_size=BATCH_TRAIN,
            max_length=MAX_LENGTH, warmup_steps=math.ceil(0.1 * steps), lr_scheduler_type="cosine", seed=SEED,
            data_seed=SEED, bf16=cuda and torch.cuda.is_bf16_supported(), **{checkpointing: cuda},
            report_to="none", save_strategy="no", logging_steps=max(1, steps // 20), disable_tqdm=True,
            dataloader_pin_memory=cuda,
        )
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
        tokens = EPOCHS * sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        output = trainer.train()
    return {"tokens_per_s": tokens / output.metrics["train_runtime"], "steps": trainer.state.global_step,
            "train_loss": output.training_loss}


def _prompts() -> list[str]:
    return [r["instruction"] for r in rows("test", PROMPTS)]


def part_infer_batched() -> dict[str, Any]:
    from llamaduo.contracts.spec import InferenceSpec
    from llamaduo.models.loading import load_causal_lm, load_tokenizer
    from llamaduo.models.resolve import resolve_base_model
    from llamaduo.services.inference.domain import StudentGenerator

    path = resolve_base_model(MODEL)
    generator = StudentGenerator(load_causal_lm(path).eval(), load_tokenizer(path),
                                 InferenceSpec(max_new_tokens=NEW_TOKENS, batch_size=BATCH))
    prompts = _prompts()
    started = time.perf_counter()
    answers = generator.generate_tokens(prompts, SYSTEM)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "new_tokens": sum(len(a[0]) for a in answers),
            "answers": [a[0] for a in answers]}


def part_infer_loop() -> dict[str, Any]:
    """One ``model.generate`` call per prompt, as a first script would do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaduo.models.resolve import resolve_base_model

    path = resolve_base_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    stop = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    answers = []
    started = time.perf_counter()
    for prompt in _prompts():
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        row = out[0, enc["input_ids"].shape[1]:].tolist()
        answers.append(row[:next((i for i, t in enumerate(row) if t in stop), len(row))])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "new_tokens": sum(len(a) for a in answers), "answers": answers}


PARTS = {"train_ours": part_train_ours, "train_bare": part_train_bare,
         "infer_batched": part_infer_batched, "infer_loop": part_infer_loop}


def run_part(name: str) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"part {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    print(f"  {name:14s} done in {result['wall_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    return result


def main() -> dict[str, Any]:
    import torch

    ours, bare = run_part("train_ours"), run_part("train_bare")
    batched, loop = run_part("infer_batched"), run_part("infer_loop")
    same = sum(a == b for a, b in zip(batched["answers"], loop["answers"], strict=True))
    return {
        "model": MODEL,
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "train_rows": TRAIN_ROWS, "train_steps": ours["steps"],
        "train_ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "train_bare_tokens_per_s": round(bare["tokens_per_s"], 1),
        "train_ratio_ours_vs_bare": round(ours["tokens_per_s"] / bare["tokens_per_s"], 3),
        "train_loss_ours": round(ours["train_loss"], 4), "train_loss_bare": round(bare["train_loss"], 4),
        "train_ours_peak_rss_mb": round(ours["peak_rss_mb"]),
        "train_bare_peak_rss_mb": round(bare["peak_rss_mb"]),
        "infer_prompts": PROMPTS, "infer_batch_size": BATCH, "infer_max_new_tokens": NEW_TOKENS,
        "infer_batched_s": round(batched["seconds"], 2),
        "infer_loop_s": round(loop["seconds"], 2),
        "infer_speedup": round(loop["seconds"] / batched["seconds"], 2),
        "infer_batched_new_tokens_per_s": round(batched["new_tokens"] / batched["seconds"], 1),
        "infer_loop_new_tokens_per_s": round(loop["new_tokens"] / loop["seconds"], 1),
        "infer_same_answers": f"{same}/{PROMPTS}",
        "infer_batched_peak_rss_mb": round(batched["peak_rss_mb"]),
        "infer_loop_peak_rss_mb": round(loop["peak_rss_mb"]),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1:  # one measured part, in its own process
        figures = PARTS[sys.argv[1]]()
        figures["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(figures))
    else:
        started = time.perf_counter()
        figures = main()
        figures["bench_seconds"] = round(time.perf_counter() - started)
        for k, v in figures.items():
            print(f"{k:34s} {v}", file=sys.stderr)
        print(json.dumps(figures))
