"""Causal-LM training (fine-tuning, or from scratch): the loop, its options and a whole run
from a model folder and data files.

A run steps AdamW with linear warmup and cosine decay over packed blocks, evaluates on the
held-out split, keeps the best model (by validation loss) in a Hub-format folder that our
loader and transformers both read, and checkpoints its full state (see checkpoint.py) so an
interrupted run resumes exactly.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import GPTNeoConfig
from ..device import resolve_device
from ..errors import GPTNeoError
from ..modeling import GPTNeoForCausalLM
from .checkpoint import (
    CHECKPOINT_DIR,
    TrainerState,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from .data import read_documents
from .optim import (
    apply_gradients,
    autocast_context,
    autocast_dtype,
    backward,
    build_optimizer,
    check_fraction,
    check_positive_ints,
    check_precision,
    epoch_order,
    grad_scaler,
    lr_factor,
    set_lr,
    trainable_parameters,
)
from .packing import LMData, prepare_lm_data
from .report import EvalStats, RateClock, Reporter, StepStats
from .saving import TRAINING_INFO, export_model, write_json


class TrainingInterrupted(GPTNeoError):
    """Training stopped early (Ctrl-C or a cancel request) after saving a checkpoint."""

    def __init__(self, message: str, checkpoint: Path, step: int) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


@dataclass
class TrainConfig:
    """Options of a causal-LM run. Invalid values raise ValueError naming the option."""

    block_size: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    """None: 5% of the steps."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr x this at the last step."""
    epochs: int = 1
    max_steps: int | None = None
    """Overrides epochs when given (the data repeats as needed)."""
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    """None: ten evaluations over the run."""
    val_fraction: float = 0.05
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10
    keep_checkpoint: bool = False
    """Keep the resumable checkpoint folder after a run that finished."""

    def validate(self) -> None:
        check_positive_ints(self, ("block_size", "batch_size", "grad_accum", "epochs", "log_every"))
        check_positive_ints(self, ("max_steps", "eval_every"), optional=True)
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_fraction("val_fraction", self.val_fraction)
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables), got {self.max_grad_norm}")
        check_precision(self.precision)


@dataclass
class TrainResult:
    output: Path
    steps: int
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    tokens_seen: int
    train_time_s: float
    history: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def evaluate_lm(
    model: torch.nn.Module,
    blocks: Sequence[torch.Tensor],
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
) -> float:
    """Mean cross-entropy (nats per token) over every target of `blocks`."""
    if not blocks:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    by_length: dict[int, list[torch.Tensor]] = {}
    for block in blocks:
        by_length.setdefault(int(block.numel()), []).append(block)
    with torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                batch = torch.stack(group[i : i + batch_size]).to(device)
                with autocast_context(device, autocast):
                    logits = model(batch[:, :-1]).logits
                loss = F.cross_entropy(
                    logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
                )
                total += float(loss)
                count += batch[:, 1:].numel()
    model.train(was_training)
    return total / count


class _StopRequested(Exception):
    """`should_stop` asked for a stop; handled like Ctrl-C."""


@dataclass
class _Plan:
    """The step counts of a run, derived from the data size and the options."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    eval_every: int

    @classmethod
    def of(cls, n_blocks: int, config: TrainConfig) -> _Plan:
        micro = math.ceil(n_blocks / config.batch_size)
        per_epoch = math.ceil(micro / config.grad_accum)
        total = config.max_steps or per_epoch * config.epochs
        warmup = (
            config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total))
        )
        return cls(
            micro, per_epoch, total, min(warmup, total), config.eval_every or max(1, total // 10)
        )


class _LMRun:
    """One causal-LM run: the model, its optimizer and state, and how it saves."""

    def __init__(
        self,
        model: GPTNeoForCausalLM,
        data: LMData,
        config: TrainConfig,
        output: Path,
        reporter: Reporter,
        save: Callable[[], None],
    ) -> None:
        self.model, self.data, self.config, self.output = model, data, config, output
        self.reporter, self.save_model = reporter, save
        self.device = model.device
        self.amp = autocast_dtype(config.precision, self.device)
        self.scaler = grad_scaler(self.device, self.amp)
        self.plan = _Plan.of(data.train.shape[0], config)
        self.checkpoint_dir = output / CHECKPOINT_DIR
        self.optimizer = build_optimizer(
            trainable_parameters(model), config.lr, config.weight_decay
        )
        self.state = TrainerState()
        self.clock = RateClock()
        self.extra: dict[str, Any] = {}
        self.window_tokens, self.window_time = 0, 0.0

    def checkpoint(self) -> None:
        save_checkpoint(
            self.checkpoint_dir, self.model, self.optimizer, self.scaler, self.state, self.extra
        )

    def evaluate_and_keep(self) -> None:
        """Evaluate, export the model if it is the best so far, and checkpoint."""
        state = self.state
        if self.data.val:
            val_loss = evaluate_lm(self.model, self.data.val, self.config.batch_size, self.amp)
            best = state.best_val_loss is None or val_loss < state.best_val_loss
            if best:
                state.best_val_loss, state.best_step = val_loss, state.step
                self.save_model()
            state.history.append(
                {"step": state.step, "val_loss": val_loss, "train_loss": state.last_train_loss}
            )
            self.reporter.evaluated(EvalStats(state.step, val_loss, best=best))
        self.checkpoint()

    def evaluate_start(self) -> None:
        """The starting point, for comparison; it is not a candidate for the best model."""
        if self.data.val and self.state.step == 0:
            initial = evaluate_lm(self.model, self.data.val, self.config.batch_size, self.amp)
            self.state.history.append({"step": 0, "val_loss": initial, "train_loss": None})
            self.reporter.evaluated(EvalStats(0, initial))

    def step(self) -> None:
        """One optimizer step, then its progress line when one is due."""
        state, plan, config = self.state, self.plan, self.config
        self.clock.start()
        micro, epoch, position = _next_batches(self.data.train, state, config, plan.micro_per_epoch)
        targets = sum(b[:, 1:].numel() for b in micro)
        lr = config.lr * lr_factor(state.step, plan.warmup, plan.total_steps, config.min_lr_ratio)
        loss = _optimizer_step(
            self.model,
            self.optimizer,
            self.scaler,
            micro,
            targets,
            lr,
            self.amp,
            config.max_grad_norm,
        )
        # The step is complete only now: a Ctrl-C before this line leaves `state` at the
        # previous step, which is what the checkpoint then records.
        state.epoch, state.batch_in_epoch = epoch, position
        state.step += 1
        state.tokens_seen += targets
        state.last_train_loss = loss
        elapsed = self.clock.stop()
        state.train_time_s += elapsed
        self.window_tokens += targets
        self.window_time += elapsed
        if state.step % config.log_every == 0 or state.step in (1, plan.total_steps):
            self.report(loss, lr)

    def report(self, loss: float, lr: float) -> None:
        state, total = self.state, self.plan.total_steps
        rate = self.window_tokens / self.window_time if self.window_time > 0 else 0.0
        self.reporter.step(
            StepStats(
                state.step,
                total,
                state.epoch,
                loss,
                lr,
                rate,
                state.train_time_s,
                self.clock.eta(total - state.step),
            )
        )
        self.window_tokens, self.window_time = 0, 0.0

    def loop(self, should_stop: Callable[[], bool] | None) -> None:
        total = self.plan.total_steps
        while self.state.step < total:
            self.step()
            if self.state.step % self.plan.eval_every == 0 and self.state.step < total:
                self.evaluate_and_keep()
            if should_stop is not None and self.state.step < total and should_stop():
                raise _StopRequested
        self.evaluate_and_keep()


def train_causal_lm(
    model: GPTNeoForCausalLM,
    data: LMData,
    config: TrainConfig,
    output: str | Path,
    *,
    tokenizer: Any = None,
    tokenizer_source: str | Path | None = None,
    resume_from: str | Path | None = None,
    reporter: Reporter | None = None,
    save_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
    info: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (on its current device) and write the best model to `output`.

    `output/checkpoint/` holds the latest resumable state, written at every evaluation and
    on interruption; pass it as `resume_from` to continue. `should_stop` is polled after each
    optimizer step (tests and UIs use it to interrupt). Ctrl-C saves a checkpoint too; both
    raise TrainingInterrupted naming the checkpoint.
    """
    config.validate()
    output = Path(output)
    if data.block_size > model.config.max_position_embeddings:
        raise ValueError(
            f"block_size: {data.block_size} exceeds the model's "
            f"{model.config.max_position_embeddings} positions"
        )
    tok_source = Path(tokenizer_source) if tokenizer_source is not None else None

    def save() -> None:
        export_model(model, output, save_dtype, tok_source, tokenizer)

    output.mkdir(parents=True, exist_ok=True)
    run = _LMRun(model, data, config, output, reporter or Reporter(), save)
    fingerprint = data.fingerprint()
    model.train()
    if resume_from is not None:
        run.state = restore_checkpoint(
            Path(resume_from), model, run.optimizer, run.scaler, fingerprint
        )
    run_info = _run_info(run, info, resumed=resume_from is not None)
    run.extra = {"config": asdict(config), "fingerprint": fingerprint, "info": run_info}
    run.reporter.start(run.plan.total_steps, run_info)
    run.evaluate_start()
    try:
        run.loop(should_stop)
    except (KeyboardInterrupt, _StopRequested):
        run.optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is discarded
        run.checkpoint()
        run.reporter.end()
        raise TrainingInterrupted(
            f"training stopped at step {run.state.step}/{run.plan.total_steps}; resume it "
            f"from {run.checkpoint_dir}",
            run.checkpoint_dir,
            run.state.step,
        ) from None
    run.reporter.end()
    if not data.val:  # nothing to choose by: the last model is the result
        save()
    return _finish(run, run_info)


def _run_info(run: _LMRun, info: dict[str, Any] | None, resumed: bool) -> dict[str, Any]:
    data, plan = run.data, run.plan
    return {
        **(info or {}),
        "train_blocks": data.train.shape[0],
        "train_tokens": data.train_tokens,
        "val_tokens": data.val_tokens,
        "train_documents": data.train_documents,
        "val_documents": data.val_documents,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "warmup_steps": plan.warmup,
        "eval_every": plan.eval_every,
        "autocast": str(run.amp).removeprefix("torch.") if run.amp else "float32",
        "device": str(run.device),
        "resumed_from_step": run.state.step if resumed else None,
    }


def _finish(run: _LMRun, run_info: dict[str, Any]) -> TrainResult:
    """Write training.json, drop the checkpoint unless kept, and sum the run up."""
    state = run.state
    result = TrainResult(
        run.output,
        state.step,
        state.best_val_loss,
        state.best_step,
        state.last_train_loss,
        state.tokens_seen,
        state.train_time_s,
        state.history,
        run_info,
    )
    write_json(
        run.output / TRAINING_INFO,
        {
            "task": "causal-lm",
            "steps": state.step,
            "best_val_loss": state.best_val_loss,
            "best_step": state.best_step,
            "final_train_loss": state.last_train_loss,
            "tokens_seen": state.tokens_seen,
            "train_time_s": round(state.train_time_s, 2),
            "history": state.history,
            "config": asdict(run.config),
            **run_info,
        },
    )
    if not run.config.keep_checkpoint and run.checkpoint_dir.exists():
        shutil.rmtree(run.checkpoint_dir)
    return result


def _next_batches(
    blocks: torch.Tensor, state: TrainerState, config: TrainConfig, micro_per_epoch: int
) -> tuple[list[torch.Tensor], int, int]:
    """The micro-batches of the next optimizer step and the (epoch, position) after them.

    An optimizer step never spans two epochs, so the last step of an epoch may have fewer
    micro-batches; the order inside an epoch comes from `epoch_order`.
    """
    epoch, position = state.epoch, state.batch_in_epoch
    if position >= micro_per_epoch:
        epoch, position = epoch + 1, 0
    order = epoch_order(blocks.shape[0], config.seed, epoch)
    micro = []
    while len(micro) < config.grad_accum and position < micro_per_epoch:
        lo = position * config.batch_size
        micro.append(blocks[order[lo : lo + config.batch_size]])
        position += 1
    return micro, epoch, position


def _optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    micro: Sequence[torch.Tensor],
    targets: int,
    lr: float,
    amp: torch.dtype | None,
    max_grad_norm: float,
) -> float:
    """Accumulate the gradients of `micro` (loss = sum over all their targets / targets),
    clip, step; returns the step's mean loss per token."""
    device = next(model.parameters()).device
    set_lr(optimizer, lr)
    step_loss = 0.0
    for batch in micro:
        batch = batch.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = model(batch[:, :-1]).logits
        loss = (
            F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            / targets
        )
        backward(loss, scaler)
        step_loss += float(loss.detach())
    apply_gradients(list(model.parameters()), optimizer, scaler, max_grad_norm)
    return step_loss


def fresh_model(
    config: GPTNeoConfig, seed: int, device: str | torch.device | None = None
) -> GPTNeoForCausalLM:
    """A randomly initialised causal LM (GPT-Neo's N(0, 0.02) init), reproducible by seed."""
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(config)
    return model.to(resolve_device(device) if device is not None else torch.device("cpu"))


def finetune(
    folder: str | Path,
    data: Sequence[str | Path],
    output: str | Path,
    config: TrainConfig,
    *,
    val_data: Sequence[str | Path] | None = None,
    suffixes: Sequence[str] | None = None,
    from_scratch: bool = False,
    device: str | torch.device | None = None,
    resume_from: str | Path | None = None,
    reporter: Reporter | None = None,
    save_dtype: torch.dtype | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_name: str | None = None,
) -> TrainResult:
    """Fine-tune the model in `folder` on text files, folders or jsonl.

    `from_scratch` ignores any weights and starts from a seeded random init of the folder's
    config.json (the tokenizer still comes from the folder): that is how the demo model is
    made. Weights train in float32 whatever the checkpoint's dtype; see `autocast_dtype`.
    `base_name` is what training.json records as the base model (default: the folder).
    """
    from ..tokenizer import Tokenizer

    config.validate()
    if resume_from is not None:
        read_checkpoint(Path(resume_from))  # fail before any heavy work
    folder = Path(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.eos_id is None:
        raise GPTNeoError(f"the tokenizer of {folder} has no eos token to separate documents")
    dev = resolve_device(device)
    autocast_dtype(config.precision, dev)  # reject e.g. float16 on CPU before loading
    docs = read_documents(data, suffixes)
    val_docs = read_documents(val_data, suffixes) if val_data else None
    lm_data = prepare_lm_data(
        docs, tokenizer, config.block_size, config.val_fraction, config.seed, val_docs
    )
    if from_scratch:
        model = fresh_model(GPTNeoConfig.from_json_file(folder), config.seed, dev)
    else:
        model = GPTNeoForCausalLM.from_pretrained(folder, device=dev)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GPTNeoError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model.config.vocab_size} embeddings"
        )
    info = {
        "base_model": base_name or str(folder),
        "from_scratch": from_scratch,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return train_causal_lm(
        model,
        lm_data,
        config,
        output,
        tokenizer=tokenizer,
        tokenizer_source=folder,
        resume_from=resume_from,
        reporter=reporter,
        save_dtype=save_dtype,
        should_stop=should_stop,
        info=info,
    )
