"""The served models, loaded: :class:`ModelRegistry`.

A folder is a trained student (what :func:`llamaduo.services.trainer.domain.train` saves, described by its
``llamaduo_student.json``) or a plain model folder (``config.json`` and a tokenizer). LoRA students of the same
base model (same base folder and quantization) share one copy of the base: the first adapter is loaded with
``PeftModel.from_pretrained``, the others with ``load_adapter``, and each request switches with ``set_adapter``
under that base's lock. A lone unquantized LoRA student is merged into its base
(:func:`~llamaduo.models.loading.load_student`, as the inference service loads it). Full students and plain
folders load on their own. Adapters can be added at run time onto any loaded base but a merged student
(:mod:`~llamaduo.serving.adapters`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from llamaduo.models.loading import (
    STUDENT_META_FILE,
    StudentMeta,
    load_causal_lm,
    load_student,
    load_tokenizer,
    read_student_meta,
    student_base_path,
)
from llamaduo.serving.api import model_not_found
from llamaduo.serving.engine import Backend, ModelDefaults, ServedModel


class ModelRegistry:
    """The served models by name, loaded at construction (see the module docstring for how).

    ``defaults``: per-model request defaults by name (see :class:`ModelDefaults`). :meth:`add` adds or replaces
    models while the registry is being served.
    """

    def __init__(self, models: Mapping[str, Path | str], defaults: Mapping[str, ModelDefaults] | None = None) -> None:
        if not models:
            raise ValueError("serving needs at least one model")
        folders: dict[str, Path] = {}
        for name, path in models.items():
            if not name or not name.strip():
                raise ValueError("served model names must be non-empty")
            folder = Path(path).expanduser()
            if not folder.is_dir():
                raise FileNotFoundError(f"model {name!r}: {folder} is not a folder")
            if not (folder / STUDENT_META_FILE).is_file() and not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"model {name!r}: {folder} is neither a trained student ({STUDENT_META_FILE}) nor a model folder "
                    "(config.json)"
                )
            folders[name] = folder
        created = int(time.time())
        self.models: dict[str, ServedModel] = {}
        self.backends: list[Backend] = []
        lora_groups: dict[tuple[str, str], list[tuple[str, Path, StudentMeta]]] = {}
        for name, folder in folders.items():
            meta = read_student_meta(folder) if (folder / STUDENT_META_FILE).is_file() else None
            if meta is not None and meta.method == "lora":
                base = str(Path(student_base_path(meta)).resolve())
                lora_groups.setdefault((base, meta.quantization), []).append((name, folder, meta))
                continue
            backend = Backend(load_causal_lm(folder).eval(), base_path=folder.resolve())
            self.backends.append(backend)
            method = meta.method if meta else "plain"
            self.models[name] = ServedModel(
                name, folder, load_tokenizer(folder), backend, method=method,
                base_model=meta.base_model if meta else None, created=created,
            )  # fmt: skip
        for (base, quantization), group in lora_groups.items():
            self._load_lora_group(base, quantization, group, created)
        self.models = {name: self.models[name] for name in folders}  # the order given
        for name, model in self.models.items():
            model.defaults = (defaults or {}).get(name) or ModelDefaults()

    def add(self, other: ModelRegistry) -> list[str]:
        """Serve ``other``'s models too; a model of the same name is replaced. Returns the replaced names.

        Requests already running on a replaced model finish on it; new ones get the new model.
        """
        replaced = [name for name in other.models if name in self.models]
        self.models = {**self.models, **other.models}
        used = {id(m.backend) for m in self.models.values()}
        self.backends = [b for b in [*self.backends, *other.backends] if id(b) in used]
        return replaced

    def _load_lora_group(
        self, base: str, quantization: str, group: list[tuple[str, Path, StudentMeta]], created: int
    ) -> None:
        if len(group) == 1 and quantization == "none":
            name, folder, meta = group[0]
            backend = Backend(load_student(folder, base))
            self.backends.append(backend)
            self.models[name] = ServedModel(
                name, folder, load_tokenizer(folder), backend, method="lora", base_model=meta.base_model,
                created=created,
            )  # fmt: skip
            return
        from peft import PeftModel

        base_model = load_causal_lm(base, quantization)
        adapters = [f"adapter_{i}" for i in range(len(group))]
        model = None
        for adapter, (_, folder, _) in zip(adapters, group, strict=True):
            if model is None:
                model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter)
            else:
                model.load_adapter(str(folder), adapter_name=adapter)
        assert model is not None
        model.set_adapter(adapters[0])
        model.eval()
        backend = Backend(model, adapters, base_path=Path(base))
        self.backends.append(backend)
        for adapter, (name, folder, meta) in zip(adapters, group, strict=True):
            self.models[name] = ServedModel(
                name, folder, load_tokenizer(folder), backend, adapter=adapter, method="lora",
                base_model=meta.base_model, created=created,
            )  # fmt: skip

    @property
    def names(self) -> list[str]:
        """The served models' names, in order."""
        return list(self.models)

    def get(self, name: str) -> ServedModel:
        """The model named ``name``; when there is none, a 404 :class:`~llamaduo.serving.api.APIError`
        (``model_not_found``)."""
        try:
            return self.models[name]
        except KeyError:
            raise model_not_found(name, self.names) from None

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models.values())
