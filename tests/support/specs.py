"""Migration specs used by several system tests."""

from __future__ import annotations

from pathlib import Path

THRESHOLD = 90.0


def triage_spec(data_path: Path) -> dict:
    return {
        "task": {"name": "ticket-triage", "system_prompt": "Route the ticket to one queue.",
                 "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": str(data_path), "seed": 0},
        "student": {
            "base_model": "tiny:llama-wide", "method": "full",
            "training": {"epochs": 30, "learning_rate": 0.001, "batch_size": 8, "max_length": 96,
                         "warmup_fraction": 0.1, "lr_scheduler": "cosine"},
            "inference": {"max_new_tokens": 6, "batch_size": 40},
        },
        "judge": {"gate": "similarity_mean", "threshold": THRESHOLD, "batch_size": 10},
        "synthesis": {"samples_per_round": 128, "seeds_per_call": 2, "examples_per_call": 8},
        "budget": {"max_rounds": 3},
    }
