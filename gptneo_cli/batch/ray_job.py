"""`gptneo batch --ray`: the same job on a Ray cluster, with Ray Data.

Ray Data's batch-inference pattern: the input is read as a dataset, and `map_batches` with
a class runs an actor pool in which each actor loads the model once and runs the same
runner (scheduler + gptneo_cli.api) over the blocks it is given. The driver writes each
record to the output as it arrives, so the resume rule is the local one: whatever is in
the output is done, a rerun skips it.

The driver spools the requests still to do into a few shard files next to the output
(bounded memory; several files give Ray several blocks to spread over the actors) and
reads them with a `local://` path, which Ray reads on the driver's node: the worker nodes
need the package and the model, not the input file. Only this module imports ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..stderr import native_stderr_hidden
from .jobs import Item, OutputWriter, bad_line_record
from .runner import Progress

RAY_INSTALL = 'pip install "gptneo-cli[ray]"'


@dataclass
class RaySpec:
    """What every actor needs to load the model and run requests (sent to each actor)."""

    model: str
    revision: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    attn: str = "auto"
    quantize: str | None = None
    max_running: int = 16
    threads: int = 1
    defaults: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    chat_template: dict[str, str] = field(default_factory=dict)
    """conversation.ChatTemplate's fields (empty: the default template)."""


class BatchActor:
    """One loaded model per actor; each call runs one block of requests to completion."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from ..conversation import ChatTemplate
        from ..device import resolve_device, resolve_dtype
        from ..hub import resolve_model_dir
        from ..loader import load_folder
        from ..tasks import CAUSAL_LM, checkpoint_head
        from .runner import make_runner

        s = RaySpec(**spec)
        path = resolve_model_dir(s.model, revision=s.revision)
        head = checkpoint_head(path)  # a classifier answers /v1/classify with its head
        quantize = s.quantize if head == CAUSAL_LM else None
        device = resolve_device(s.device)
        dtype = resolve_dtype(s.dtype, device, quantize)
        model, tokenizer = load_folder(
            path,
            head=head,
            dtype=dtype,
            device=device,
            attn=s.attn,
            quantize=quantize,
            threads=max(1, s.threads),
        )
        self.runner, self.scheduler = make_runner(
            model,
            tokenizer,
            model_name=s.model,
            max_running=s.max_running,
            defaults=s.defaults,
            aliases=s.aliases,
            chat_template=ChatTemplate(**s.chat_template) if s.chat_template else None,
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        items = [Item(**json.loads(text)) for text in batch["text"]]
        records: list[dict[str, Any]] = []
        self.runner.run(items, records.append)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def _spool(items: Iterable[Item], folder: Path, shards: int, bad: Callable[[Item], None]) -> int:
    """Write runnable items round-robin into `shards` files; bad lines go to `bad`."""
    files = [open(folder / f"part-{i:04d}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    count = 0
    try:
        for item in items:
            if item.error is not None or item.body is None:
                bad(item)
                continue
            line = json.dumps(
                {
                    "line": item.line,
                    "custom_id": item.custom_id,
                    "url": item.url,
                    "body": item.body,
                },
                ensure_ascii=False,
            )
            files[count % shards].write(line + "\n")
            count += 1
    finally:
        for f in files:
            f.close()
    for i in range(min(count, shards), shards):  # no empty files: Ray skips nothing for us
        os.unlink(folder / f"part-{i:04d}.jsonl")
    return count


def run_on_ray(
    items: Iterable[Item],
    output: Path,
    spec: RaySpec,
    *,
    address: str | None = None,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    progress: Progress | None = None,
    on_record: Callable[[dict[str, Any], Progress], None] | None = None,
) -> Progress:
    """Run `items` on Ray (joining `address`, or the running/ a new local instance)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ValueError(f"--ray needs Ray: {RAY_INSTALL}") from None
    progress = progress or Progress()

    def emit(writer: OutputWriter, record: dict[str, Any]) -> None:
        writer.write(record)
        progress.count(record)
        if on_record is not None:
            on_record(record, progress)

    folder = Path(tempfile.mkdtemp(prefix=".gptneo-batch-", dir=output.parent or "."))
    try:
        with OutputWriter(output) as writer:
            count = _spool(
                items, folder, max(1, actors) * 4, lambda item: emit(writer, bad_line_record(item))
            )
            if count == 0:
                return progress
            # Ray's C++ core logs on descriptor 2 (warnings at error level, e.g. about the
            # constructor arguments it keeps for actor restarts): muted, so the job's stderr
            # keeps our own errors and the progress bar (the CLI draws it on a copy of the
            # descriptor); Ray's failures still raise, reported once the descriptor is back.
            sys.stderr.flush()
            with native_stderr_hidden():
                _run(
                    ray,
                    folder,
                    spec,
                    actors,
                    cpus_per_actor,
                    gpus_per_actor,
                    address,
                    lambda record: emit(writer, json.loads(record)),
                    progress,
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return progress


def _run(
    ray: Any,
    folder: Path,
    spec: RaySpec,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    address: str | None,
    emit: Callable[[str], None],
    progress: Progress,
) -> None:
    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # local:// is deprecated for clusters, see above
        warnings.simplefilter("ignore")
        # Reading takes no CPU slot: the actors may hold every CPU of a small machine.
        dataset = ray.data.read_text(f"local://{folder}", drop_empty_lines=True, num_cpus=0)
    results = dataset.map_batches(
        BatchActor,
        fn_constructor_kwargs={"spec": asdict(spec)},
        batch_size=spec.max_running * 4,
        concurrency=actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    progress.started = time.perf_counter()
    for row in results.iter_rows():
        emit(row["record"])
