"""Read checkpoint tensors: safetensors (single or sharded) first, pytorch_model.bin otherwise.

Safetensors are memory-mapped by the safetensors library and each tensor is handed to the
model as it is read, so no second full copy of the weights is ever held. A .bin file is read
with `torch.load(weights_only=True)` only: a pickle that is more than tensors is refused.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import WeightsError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights in `folder`, safetensors preferred."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            return _shards(folder / index)
    raise WeightsError(
        f"no weights in {folder}: expected {SAFETENSORS}, {SAFETENSORS_INDEX} or {PYTORCH_BIN}"
    )


def _shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"cannot read shard index {index_path}: {exc}") from exc
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise WeightsError(f"{index_path.name} lists missing shard(s): {', '.join(missing)}")
    return [index_path.parent / n for n in names]


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor in the checkpoint files, one at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            yield from _iter_safetensors(path)
        else:
            yield from _load_bin(path).items()


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path.name} is not a readable safetensors file ({exc})") from exc


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path.name} was refused: it is not a plain tensor checkpoint "
            f"(read with weights_only=True: {first})"
        ) from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise WeightsError(f"{path.name} does not hold a name -> tensor mapping")
    return data


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors in the Hub's layout (contiguous, no shared storage)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})
