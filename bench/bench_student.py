"""Student benchmark on SmolLM2-135M (CPU or GPU, whatever torch finds), on the invoice task.

1. Training throughput: our ``train()`` (LoRA) against a bare TRL ``SFTTrainer`` script with the same model,
   data and settings, in tokens per second of training time (tokens / ``train_runtime``). Both run in one
   process, alternating (``BENCH_TRAIN_REPEATS`` pairs, the order swapped every pair so warm-up favours
   neither), so load on a shared machine hits both alike; the ratio of each pair and its min/median/max. The
   CPU seconds of ``Trainer.train`` in each are compared too (bare / ours), less sensitive to other load.
2. Inference: ``StudentGenerator`` against batched ``model.generate`` as a user writes it with transformers
   (chat template, left padding, the same batch size, greedy, same ``max_new_tokens``); ratio of wall times and
   of CPU seconds (the two run in separate processes one after the other, so other load can hit one only).
   A per-prompt ``generate`` loop on ``BENCH_LOOP_PROMPTS`` prompts is given for reference only (s/prompt).
3. Peak resident memory of each part: every measured part runs in its own subprocess.

Sizes can be changed with environment variables (``BENCH_TRAIN_ROWS``, ``BENCH_PROMPTS``, ``BENCH_NEW_TOKENS``,
``BENCH_BATCH``, ``BENCH_TRAIN_REPEATS``, ``BENCH_LOOP_PROMPTS``). Last stdout line: one JSON object.
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
TRAIN_ROWS = int(os.environ.get("BENCH_TRAIN_ROWS", "8"))
TRAIN_REPEATS = int(os.environ.get("BENCH_TRAIN_REPEATS", "3"))
LOOP_PROMPTS = int(os.environ.get("BENCH_LOOP_PROMPTS", "4"))
PROMPTS = int(os.environ.get("BENCH_PROMPTS", "16"))
NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", "80"))  # the demo spec's max_new_tokens
BATCH = int(os.environ.get("BENCH_BATCH", "16"))
#: Training settings shared by both training parts (our StudentSpec and the bare SFTConfig).
LR, BATCH_TRAIN, MAX_LENGTH, LORA_R, LORA_ALPHA, EPOCHS, SEED = 1e-3, 2, 384, 16, 32, 1, 0


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


def part_train_pairs() -> dict[str, Any]:
    """``TRAIN_REPEATS`` pairs of (ours, bare), alternating, the order swapped every pair.

    Besides wall-clock tokens/s (``train_runtime``), the CPU time of this process during ``Trainer.train`` (both
    setups go through it: ``SFTTrainer`` is a ``Trainer``) is recorded: on a machine shared with other busy
    processes it measures the work done, which wall time does not."""
    import gc

    import transformers

    cpu: list[float] = []
    original = transformers.Trainer.train

    def timed_train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            cpu.append(time.process_time() - started)

    transformers.Trainer.train = timed_train  # type: ignore[method-assign]
    pairs = []
    for r in range(TRAIN_REPEATS):
        order = ("ours", "bare") if r % 2 == 0 else ("bare", "ours")
        pair: dict[str, Any] = {}
        for name in order:
            pair[name] = part_train_ours() if name == "ours" else part_train_bare()
            pair[name]["cpu_s"] = cpu[-1]
            gc.collect()
        pair["ratio"] = pair["ours"]["tokens_per_s"] / pair["bare"]["tokens_per_s"]
        pair["cpu_ratio"] = pair["bare"]["cpu_s"] / pair["ours"]["cpu_s"]
        print(f"  pair {r}: ours {pair['ours']['tokens_per_s']:.1f} tok/s, bare {pair['bare']['tokens_per_s']:.1f}"
              f" tok/s, ratio {pair['ratio']:.3f}; CPU s ours {pair['ours']['cpu_s']:.1f}, bare "
              f"{pair['bare']['cpu_s']:.1f}, ratio {pair['cpu_ratio']:.3f}", file=sys.stderr)
        pairs.append(pair)
    return {"pairs": pairs}


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
    started, cpu = time.perf_counter(), time.process_time()
    answers = generator.generate_tokens(prompts, SYSTEM)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"seconds": seconds, "cpu_s": cpu, "new_tokens": sum(len(a[0]) for a in answers),
            "answers": [a[0] for a in answers]}


def _hf_model() -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaduo.models.resolve import resolve_base_model

    path = resolve_base_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def _cut(row: list[int], stop: list[int]) -> list[int]:
    return row[:next((i for i, t in enumerate(row) if t in stop), len(row))]


def part_infer_hf() -> dict[str, Any]:
    """Batched ``model.generate`` as a user writes it with transformers: chat template, left padding, batches
    of ``BATCH`` prompts in the data's order, greedy. Then, for reference only, a per-prompt loop on the first
    ``LOOP_PROMPTS`` prompts."""
    import torch

    model, tokenizer = _hf_model()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")})
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}],
                                           tokenize=False, add_generation_prompt=True) for p in _prompts()]
    answers = []
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i:i + BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        answers += [_cut(row, stop) for row in out[:, enc["input_ids"].shape[1]:].tolist()]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    loop_answers = []
    started = time.perf_counter()
    for text in texts[:LOOP_PROMPTS]:
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        loop_answers.append(_cut(out[0, enc["input_ids"].shape[1]:].tolist(), stop))
    loop_seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_s": cpu, "new_tokens": sum(len(a) for a in answers), "answers": answers,
            "loop_seconds": loop_seconds, "loop_new_tokens": sum(len(a) for a in loop_answers),
            "loop_answers": loop_answers}


PARTS = {"train_ours": part_train_ours, "train_bare": part_train_bare, "train_pairs": part_train_pairs,
         "infer_batched": part_infer_batched, "infer_hf": part_infer_hf}


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
    import statistics

    import torch

    pairs = run_part("train_pairs")
    batched, hf = run_part("infer_batched"), run_part("infer_hf")
    ratios = [p["ratio"] for p in pairs["pairs"]]
    cpu_ratios = [p["cpu_ratio"] for p in pairs["pairs"]]
    ours_tps = [p["ours"]["tokens_per_s"] for p in pairs["pairs"]]
    bare_tps = [p["bare"]["tokens_per_s"] for p in pairs["pairs"]]
    same = sum(a == b for a, b in zip(batched["answers"], hf["answers"], strict=True))
    same_loop = sum(a == b for a, b in zip(batched["answers"], hf["loop_answers"], strict=False))
    first = pairs["pairs"][0]
    return {
        "model": MODEL,
        "device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "train_rows": TRAIN_ROWS, "train_batch": BATCH_TRAIN, "train_steps": first["ours"]["steps"],
        "train_repeats": TRAIN_REPEATS,
        "train_ours_tokens_per_s_median": round(statistics.median(ours_tps), 1),
        "train_bare_tokens_per_s_median": round(statistics.median(bare_tps), 1),
        "train_ratio_ours_vs_bare_median": round(statistics.median(ratios), 3),
        "train_ratio_min": round(min(ratios), 3), "train_ratio_max": round(max(ratios), 3),
        "train_ratios": [round(r, 3) for r in ratios],
        "train_cpu_ratio_bare_vs_ours_median": round(statistics.median(cpu_ratios), 3),
        "train_cpu_ratio_min": round(min(cpu_ratios), 3), "train_cpu_ratio_max": round(max(cpu_ratios), 3),
        "train_cpu_s_ours": [round(p["ours"]["cpu_s"], 1) for p in pairs["pairs"]],
        "train_cpu_s_bare": [round(p["bare"]["cpu_s"], 1) for p in pairs["pairs"]],
        "train_loss_ours": round(first["ours"]["train_loss"], 4),
        "train_loss_bare": round(first["bare"]["train_loss"], 4),
        "train_peak_rss_mb": round(pairs["peak_rss_mb"]),
        "infer_prompts": PROMPTS, "infer_batch_size": BATCH, "infer_max_new_tokens": NEW_TOKENS,
        "infer_ours_s": round(batched["seconds"], 2),
        "infer_hf_batched_s": round(hf["seconds"], 2),
        "infer_ratio_hf_batched_vs_ours": round(hf["seconds"] / batched["seconds"], 3),
        "infer_ours_cpu_s": round(batched["cpu_s"], 1), "infer_hf_batched_cpu_s": round(hf["cpu_s"], 1),
        "infer_cpu_ratio_hf_batched_vs_ours": round(hf["cpu_s"] / batched["cpu_s"], 3),
        "infer_ours_new_tokens_per_s": round(batched["new_tokens"] / batched["seconds"], 1),
        "infer_hf_batched_new_tokens_per_s": round(hf["new_tokens"] / hf["seconds"], 1),
        "infer_same_answers": f"{same}/{PROMPTS}",
        "infer_loop_prompts": LOOP_PROMPTS,
        "infer_loop_s_per_prompt": round(hf["loop_seconds"] / LOOP_PROMPTS, 2),
        "infer_ours_s_per_prompt": round(batched["seconds"] / PROMPTS, 2),
        "infer_loop_new_tokens_per_s": round(hf["loop_new_tokens"] / hf["loop_seconds"], 1),
        "infer_loop_same_answers": f"{same_loop}/{LOOP_PROMPTS}",
        "infer_ours_peak_rss_mb": round(batched["peak_rss_mb"]),
        "infer_hf_peak_rss_mb": round(hf["peak_rss_mb"]),
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
