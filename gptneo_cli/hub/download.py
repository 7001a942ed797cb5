"""Download: make the files of a model available locally, from the cache when it has them,
else from the Hub through huggingface_hub (only what gptneo needs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GPTNeoConfig
from ..errors import ConfigError, GPTNeoError, HubError, ModelNotFoundError
from .errors import (
    RETRYABLE_STATUS,
    http_status,
    hub_error,
    hub_log_captured,
    is_network_error,
    offline_error,
    short_reason,
)
from .names import (
    _COMMIT_RE,
    CONFIG_FILE,
    DEFAULT_MODEL,
    PARTS,
    cache_dir,
    endpoint,
    has_parts,
    is_offline,
    parse_model_name,
    plan_files,
    select_weights,
    shards_from_index,
)
from .units import format_bytes


@dataclass
class Snapshot:
    """A model on local disk, and where it came from."""

    folder: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    #: The repo's file listing (name -> size) when the Hub was asked; None when offline.
    remote_files: dict[str, int | None] | None = None
    #: The files of the repo that gptneo would fetch (config, tokenizer, weights).
    wanted: list[str] = field(default_factory=list)


def resolve_model_dir(name: str | os.PathLike[str], revision: str | None = None) -> Path:
    """Return a local folder with config.json, weights and tokenizer files for `name`.

    A folder is returned as is; a Hub id or alias is downloaded into the HF cache when
    needed (progress on stderr) and its snapshot folder returned.
    """
    return fetch(name, revision).folder


def fetch(
    name: str | os.PathLike[str],
    revision: str | None = None,
    parts: Iterable[str] = PARTS,
) -> Snapshot:
    """Make `parts` ("config", "tokenizer", "weights") of a model available locally.

    Order of business: a pinned commit already in the cache needs no network; offline
    (HF_HUB_OFFLINE=1, or the Hub unreachable) the cache is used; otherwise the Hub is
    asked once for the file list and only missing files are downloaded.
    """
    wanted_parts = set(parts)
    unknown = wanted_parts - set(PARTS)
    if unknown:
        raise ValueError(f"parts: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    ref = parse_model_name(name, revision)
    if ref.path is not None:
        return Snapshot(folder=ref.path)
    assert ref.repo_id is not None
    return _fetch_from_hub(ref.repo_id, ref.revision or "main", wanted_parts)


def _fetch_from_hub(repo_id: str, revision: str, parts: set[str]) -> Snapshot:
    if _COMMIT_RE.match(revision):
        cached = cached_snapshot(repo_id, revision)
        if cached is not None and has_parts(cached, parts, tokenizer_required=True):
            return Snapshot(cached, repo_id, revision, revision)
    if is_offline():
        return _from_cache(repo_id, revision, parts, reason=None)
    try:
        listing, commit = _list_repo(repo_id, revision)
    except _NetworkTrouble as trouble:
        return _from_cache(repo_id, revision, parts, reason=str(trouble))
    return _download(repo_id, revision, commit, listing, parts)


class _NetworkTrouble(Exception):
    """The Hub could not be reached (as opposed to answering with an error)."""


def _list_repo(repo_id: str, revision: str) -> tuple[dict[str, int | None], str]:
    """Ask the Hub for the commit `revision` points at and the files it holds."""
    from huggingface_hub import HfApi, constants

    try:
        with hub_log_captured():
            info = HfApi().model_info(
                repo_id,
                revision=revision,
                files_metadata=True,
                timeout=constants.HF_HUB_ETAG_TIMEOUT,
            )
    except Exception as exc:  # noqa: BLE001 - sorted into network trouble vs. answers
        if is_network_error(exc) or http_status(exc) in RETRYABLE_STATUS:
            raise _NetworkTrouble(short_reason(exc)) from exc
        raise hub_error(exc, repo_id, revision) from exc
    if not info.sha:
        raise HubError(f"{endpoint()} sent no commit id for {repo_id}: is HF_ENDPOINT a Hub?")
    listing = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    return listing, info.sha


def _download(
    repo_id: str, revision: str, commit: str, listing: dict[str, int | None], parts: set[str]
) -> Snapshot:
    from huggingface_hub import hf_hub_download

    if CONFIG_FILE not in listing:
        raise ModelNotFoundError(
            f"{repo_id} has no config.json at revision {revision}: it is not "
            "a transformers model repo"
        )
    current = CONFIG_FILE
    cache = cache_dir()

    def get(filename: str, rev: str) -> Path:
        nonlocal current
        current = filename
        with hub_log_captured():  # its retry lines would come before our one error line
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=rev,
                    cache_dir=cache,
                    tqdm_class=_progress_bar(filename),
                )
            )

    try:
        # The config comes first, by branch name so the cache records the ref (offline use
        # of "main" needs it), and is checked before any large file is fetched.
        folder = get(CONFIG_FILE, revision).parent
        _check_gpt_neo(folder / CONFIG_FILE, repo_id)
        wanted = plan_files(listing, parts)
        if "weights" in parts:
            if not select_weights(listing):
                raise ModelNotFoundError(
                    f"{repo_id} has no PyTorch weights (model.safetensors or "
                    f"pytorch_model.bin) at revision {revision}"
                )
            if wanted[-1].endswith(".index.json"):
                wanted += shards_from_index(get(wanted[-1], commit))
        missing = [name for name in wanted if not (folder / name).is_file()]
        _check_disk_space(repo_id, cache, sum(listing.get(name) or 0 for name in missing))
        for name in missing:
            get(name, commit)
    except GPTNeoError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        raise hub_error(exc, repo_id, revision, current) from exc
    return Snapshot(folder, repo_id, revision, folder.name, listing, wanted)


def _progress_bar(filename: str) -> Any:
    """huggingface_hub's bar (stderr, shown on a terminal only), labelled with the file name
    instead of the tail of its URL."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class FileBar(hub_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["desc"] = filename
            super().__init__(*args, **kwargs)

    return FileBar


def _check_gpt_neo(config_file: Path, repo_id: str) -> None:
    try:
        GPTNeoConfig.from_json_file(config_file)
    except ConfigError as exc:
        raise ConfigError(
            f"{repo_id}: {exc}; gptneo runs GPT-Neo checkpoints such as {DEFAULT_MODEL}"
        ) from exc


def _check_disk_space(repo_id: str, cache: Path, needed: int) -> None:
    if needed <= 0:
        return
    free = free_bytes(cache)
    if free is not None and free < needed:
        raise HubError(
            f"not enough disk space for {repo_id}: it needs {format_bytes(needed)} but "
            f"{cache} has {format_bytes(free)} free; free some space or set HF_HUB_CACHE to a "
            "folder on a bigger disk"
        )


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk that holds `folder` (or its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def cached_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch, tag or commit)."""
    repo_folder = cache_dir() / f"models--{repo_id.replace('/', '--')}"
    commit = revision
    if not _COMMIT_RE.match(revision):
        ref = repo_folder / "refs" / revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except OSError:
            return None
    snapshot = repo_folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _from_cache(repo_id: str, revision: str, parts: set[str], reason: str | None) -> Snapshot:
    """Serve from the cache without the network, or say why that is impossible."""
    why = (
        "HF_HUB_OFFLINE is set"
        if reason is None
        else f"the Hub at {endpoint()} cannot be reached: {reason}"
    )
    fix = (
        "unset HF_HUB_OFFLINE to download it"
        if reason is None
        else "check your network connection and try again"
    )
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise offline_error(
            f"{repo_id} (revision {revision}) is not in the cache ({cache_dir()}) and {why}; {fix}"
        )
    if not has_parts(snapshot, parts):
        raise HubError(
            f"{repo_id} is only partly downloaded in {snapshot} and {why}; {fix} to "
            "finish the download"
        )
    return Snapshot(snapshot, repo_id, revision, snapshot.name)
