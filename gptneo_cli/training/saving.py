"""Saving a model folder so that it is always either wholly old or wholly new.

Every file of the new model (config.json, weights, tokenizer files) is written into a hidden
staging folder beside the target, `.NAME.saving-PID-XXXX`. Whatever else the old folder held
(a training checkpoint, training.json, unrelated files) is hard-linked (or copied) into the
staging folder too. Then the two folders are exchanged in one step (Linux renameat2
RENAME_EXCHANGE; elsewhere two renames with a rollback) and the old one is deleted.

A failure (an exception, a full disk, Ctrl-C) removes the staging folder and leaves the
target untouched. A process killed outright (SIGKILL, power loss) cannot clean up: its
staging folder stays beside the target, never inside it, and the next save to the same
target removes it (or, if the kill fell between the fallback's two renames, puts the old
folder back first).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..tokenizer import TOKENIZER_FILES

#: Written next to a trained model: what the run was (options, data, results).
TRAINING_INFO = "training.json"

#: Files that belong to a saved model and are replaced (never carried over) by a new save.
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    *TOKENIZER_FILES,
}
_STAGING = ".saving-"


def is_model_file(name: str) -> bool:
    """True for the files a model save writes or would leave stale (shards included)."""
    if name in MODEL_FILES:
        return True
    return name.startswith(("model-", "pytorch_model-")) and name.endswith((".safetensors", ".bin"))


def staging_prefix(folder: Path) -> str:
    return f".{folder.name}{_STAGING}"


def leftover_staging(folder: Path) -> list[Path]:
    """Staging folders of earlier saves to `folder` whose process is gone."""
    parent = folder.parent
    if not parent.is_dir():
        return []
    found = []
    for entry in parent.iterdir():
        if not entry.name.startswith(staging_prefix(folder)):
            continue
        pid = entry.name[len(staging_prefix(folder)) :].split("-", 1)[0]
        if not (pid.isdigit() and _alive(int(pid))):
            found.append(entry)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers are from a save that already failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def staged_folder(folder: str | Path, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it replaces `folder` in one step.

    `carry(name)` says which entries of the old folder move over to the new one (default:
    every entry that is not a model file). On any failure the staging folder is removed and
    `folder` is left as it was.
    """
    target = Path(folder).expanduser().resolve()  # a symlinked folder is saved where it points
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    staging = target.with_name(f"{staging_prefix(target)}{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        yield staging
        if target.is_dir():
            _carry_over(target, staging, carry or (lambda name: not is_model_file(name)))
        _fsync_dir(staging)
        _switch(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)  # after the switch it holds the old folder
    _fsync_dir(target.parent)


def _recover(target: Path) -> None:
    """Clear what a killed save left beside `target`. If it died between the two renames of
    the fallback switch, `target` is missing and its old contents wait under an `-old-`
    name: put them back first, so nothing is ever deleted that was the only copy."""
    stale = leftover_staging(target)
    old = [p for p in stale if "-old-" in p.name]
    if old and not target.exists():
        os.rename(old[0], target)
        stale.remove(old[0])
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    for entry in old.iterdir():
        if (new / entry.name).exists() or entry.name.startswith(".") and _STAGING in entry.name:
            continue
        if not keep(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link (instant, no space) where the file system allows one, else a copy."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _switch(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; afterwards `staging` holds the old folder (if any)."""
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        return
    old = target.with_name(f"{staging_prefix(target)}{os.getpid()}-old-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    os.rename(old, staging)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def export_model(
    model: torch.nn.Module,
    folder: Path,
    dtype: torch.dtype | None = None,
    tokenizer_source: Path | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a Hub-format folder (config.json, model.safetensors, tokenizer files) atomically.

    Tokenizer files are copied from `tokenizer_source` when it has them (byte-identical to
    the base model's), else written from `tokenizer`.
    """
    folder = Path(folder)
    target = model
    if dtype is not None and dtype != model.dtype:
        target = copy.deepcopy(model).to(dtype)
        target.config = copy.deepcopy(model.config)
    target.config.torch_dtype = str(target.dtype).removeprefix("torch.")
    with staged_folder(folder) as staging:
        target.save_pretrained(staging)
        copied = copy_tokenizer_files(tokenizer_source, staging) if tokenizer_source else False
        if not copied and tokenizer is not None:
            tokenizer.save(staging)
    return folder


def copy_tokenizer_files(source: Path, folder: Path) -> bool:
    """Copy the tokenizer files `source` has into `folder`; False when it has none."""
    copied = False
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied = True
    return copied


def write_json(path: Path, data: Any) -> None:
    """Write JSON beside `path`, then rename over it (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
