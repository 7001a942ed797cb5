"""Resolve a model name ("125m" | "org/name" | ./dir) to a local folder.

Placeholder: local folders only. The Hub issue extends this with huggingface_hub.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError


def resolve_model_dir(name: str | Path, revision: str | None = None) -> Path:
    """Return a local folder holding config.json and weights for `name`."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise ModelNotFoundError(f"model folder not found: {name}")
