"""The BentoML model store: importing a model into it, reading what it holds.

A store entry holds `model/` and `tokenizer/` in Hugging Face format. Its
metadata records where the weights came from (`source`), so importing the same
source again finds the entry instead of piling up copies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

from textgen.engine import ModelInfo
from textgen.models import parameter_count


def find_imported(name: str, source: str) -> Any | None:
    """The newest store entry named `name` imported from `source`, if any."""
    try:
        entries = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return None
    matches = [m for m in entries if m.info.metadata.get("source") == source]
    return max(matches, key=lambda m: m.info.creation_time, default=None)


def import_model(
    name: str, model: Any, tokenizer: Any, source: str, random_weights: bool, **extra: Any
) -> str:
    """Saves model and tokenizer as a new store entry; returns its tag."""
    kind = source.split(":", 1)[0]  # hub | dir | random
    metadata = {
        "source": source,
        "random_weights": random_weights,
        "architecture": model.config.architectures[0]
        if model.config.architectures
        else type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": parameter_count(model),
        "context_length": model.config.n_positions,
        **{k: v for k, v in extra.items() if v is not None},  # the store takes no None
    }
    labels = {"source": kind, "architecture": model.config.model_type}
    if random_weights:
        labels["weights"] = "random"
    with bentoml.models.create(name, labels=labels, metadata=metadata) as entry:
        model.save_pretrained(Path(entry.path) / "model")
        tokenizer.save_pretrained(Path(entry.path) / "tokenizer")
    return str(entry.tag)


def model_info(entry: Any) -> ModelInfo:
    """What the service reports about a store entry."""
    meta = entry.info.metadata
    return ModelInfo(
        name=entry.tag.name,
        tag=str(entry.tag),
        source=str(meta.get("source", "unknown")),
        random_weights=bool(meta.get("random_weights", False)),
        n_ctx=int(meta.get("context_length", 1024)),
    )
