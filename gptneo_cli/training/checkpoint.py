"""Resumable training state: weights, optimizer, loss scaler, RNG and the trainer's position.

GPT-Neo has no dropout and the data order is a pure function of (seed, epoch), so a run
resumed from a checkpoint on the same machine takes the same steps as one never stopped.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import GPTNeoError
from .saving import staged_folder, write_json

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


class CheckpointMismatch(GPTNeoError):
    """The checkpoint was made from other data or other data options than this run's."""

    def __init__(self, folder: Path) -> None:
        super().__init__(
            f"{folder} was trained on different data (or a different block_size, "
            "val_fraction or seed): resume with the same data and options"
        )
        self.folder = folder


@dataclass
class TrainerState:
    """Where a run is: enough to resume it exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of `epoch` already consumed."""
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_train_loss: float | None = None
    train_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    state: TrainerState,
    extra: dict[str, Any],
) -> Path:
    """Write model, optimizer, scaler, RNG and trainer state; replaces `folder` atomically."""
    with staged_folder(folder, carry=lambda name: False) as staging:
        model.save_pretrained(staging)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(),
            },
            staging / OPTIMIZER_STATE,
        )
        write_json(staging / TRAINER_STATE, {"state": asdict(state), **extra})
    return folder


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint folder, with a clear error if it is not one."""
    path = Path(folder) / TRAINER_STATE
    if not path.is_file() or not (Path(folder) / OPTIMIZER_STATE).is_file():
        raise GPTNeoError(
            f"{folder} is not a training checkpoint (no {TRAINER_STATE} or "
            f"{OPTIMIZER_STATE}); pass the 'checkpoint' folder of an earlier run"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise GPTNeoError(f"{path} is not valid JSON: the checkpoint is damaged") from exc


def restore_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    fingerprint: str,
) -> TrainerState:
    """Load a checkpoint's weights, optimizer, scaler and RNG state into this run."""
    saved = read_checkpoint(folder)
    if saved.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(folder)
    device = next(model.parameters()).device
    resumed = type(model).from_pretrained(folder, device=device)
    model.load_state_dict(resumed.state_dict())
    del resumed
    blob = torch.load(folder / OPTIMIZER_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    _set_rng_state(blob["rng"])
    return TrainerState(**saved["state"])
