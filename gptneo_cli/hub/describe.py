"""Describe: a model's config, size, files and memory before its weights are downloaded."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import GPTNeoConfig
from .download import fetch
from .names import PYTORCH_BIN_INDEX, SAFETENSORS_INDEX, plan_files, weights_present

#: Bytes per parameter for the weights alone, per dtype gptneo can load.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass
class FileEntry:
    """One file of a model repo as `models info` lists it."""

    name: str
    size: int | None  # None: the Hub did not say
    present: bool  # on local disk
    needed: bool  # gptneo fetches it (config, tokenizer, the chosen weights)


@dataclass
class ModelSummary:
    """What `gptneo models info` shows: enough to decide before downloading weights."""

    name: str
    repo_id: str | None
    revision: str | None
    commit: str | None
    folder: Path
    config: GPTNeoConfig
    files: list[FileEntry]
    weights_present: bool
    online: bool

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def memory(self) -> dict[str, int]:
        """Bytes the weights take in memory per dtype (activations and KV cache extra)."""
        return {dtype: self.num_parameters * size for dtype, size in DTYPE_BYTES.items()}

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "folder": str(self.folder),
            "parameters": self.num_parameters,
            "weights_present": self.weights_present,
            "config": {
                "num_layers": c.num_layers,
                "hidden_size": c.hidden_size,
                "num_heads": c.num_heads,
                "intermediate_size": c.inner_size,
                "vocab_size": c.vocab_size,
                "max_position_embeddings": c.max_position_embeddings,
                "window_size": c.window_size,
                "attention_layers": c.attention_layers,
                "activation_function": c.activation_function,
                "torch_dtype": c.torch_dtype,
            },
            "memory_bytes": self.memory(),
            "files": [asdict(f) for f in self.files],
        }


def describe(name: str, revision: str | None = None) -> ModelSummary:
    """Config, parameter count, files and memory of a model, fetching only config.json."""
    snap = fetch(name, revision, parts=("config",))
    config = GPTNeoConfig.from_json_file(snap.folder)
    if snap.remote_files is not None:
        listing = snap.remote_files
    else:
        listing = {p.name: p.stat().st_size for p in snap.folder.iterdir() if p.is_file()}
    needed = set(plan_files(listing))
    for index, suffix in ((SAFETENSORS_INDEX, ".safetensors"), (PYTORCH_BIN_INDEX, ".bin")):
        if index in needed:
            needed |= {n for n in listing if n.endswith(suffix)}
    files = [
        FileEntry(n, s, (snap.folder / n).is_file(), n in needed)
        for n, s in sorted(listing.items())
    ]
    return ModelSummary(
        name=os.fspath(name),
        repo_id=snap.repo_id,
        revision=snap.revision,
        commit=snap.commit,
        folder=snap.folder,
        config=config,
        files=files,
        weights_present=weights_present(snap.folder),
        online=snap.remote_files is not None,
    )
