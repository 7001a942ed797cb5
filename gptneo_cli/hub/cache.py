"""Cache admin: list, find and remove the models in the Hugging Face cache."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import GPTNeoConfig
from ..errors import ConfigError, HubError, ModelNotFoundError
from .errors import hub_log_captured, short_reason
from .names import CONFIG_FILE, cache_dir, expand_alias, weights_present


@dataclass
class CachedModel:
    """One cached revision of a GPT-Neo repo."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    folder: Path
    size_on_disk: int
    config: GPTNeoConfig | None  # None only for non-GPT-Neo repos (cached_models(include_all))
    complete: bool

    @property
    def revision(self) -> str:
        """The branch/tag names of this commit, or its short id when none points at it."""
        return ",".join(sorted(self.refs)) or self.commit[:12]

    @property
    def num_parameters(self) -> int | None:
        return None if self.config is None else self.config.num_parameters()


def cached_models(include_all: bool = False) -> list[CachedModel]:
    """The GPT-Neo snapshots in the Hub cache (every model repo when `include_all`)."""
    from huggingface_hub import scan_cache_dir

    cache = cache_dir()
    if not cache.is_dir():
        return []
    try:
        report = scan_cache_dir(cache)
    except Exception as exc:  # noqa: BLE001 - CacheNotFound, ValueError for a file, OSError
        raise HubError(f"cannot read the Hub cache {cache}: {short_reason(exc)}") from exc
    models = []
    for repo in report.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            config: GPTNeoConfig | None = None
            try:
                config = GPTNeoConfig.from_json_file(rev.snapshot_path / CONFIG_FILE)
            except ConfigError:
                if not include_all:
                    continue
            models.append(
                CachedModel(
                    repo_id=repo.repo_id,
                    commit=rev.commit_hash,
                    refs=tuple(sorted(rev.refs)),
                    folder=rev.snapshot_path,
                    size_on_disk=rev.size_on_disk,
                    config=config,
                    complete=weights_present(rev.snapshot_path),
                )
            )
    return sorted(models, key=lambda m: (m.repo_id.lower(), m.revision))


def remove_cached(name: str, revision: str | None = None) -> tuple[list[CachedModel], int]:
    """Delete a model (all revisions, or one branch/tag/commit) from the Hub cache.

    Returns the removed snapshots and the bytes freed.
    """
    from huggingface_hub import scan_cache_dir

    matches = find_cached(name, revision)
    strategy = scan_cache_dir(cache_dir()).delete_revisions(*(m.commit for m in matches))
    freed = strategy.expected_freed_size
    paths = [*strategy.refs, *strategy.snapshots, *strategy.blobs, *strategy.repos]
    locked = sorted({str(p.parent) for p in paths if not os.access(p.parent, os.W_OK)})
    if locked:  # checked first, so that nothing is half removed
        raise HubError(
            f"cannot remove {name} from the cache: {locked[0]} is read-only "
            "(permission denied); nothing was removed"
        )
    failures = _execute_quietly(strategy)
    if failures:
        raise HubError(
            f"could not remove all of {name} from the cache: {failures[0]}"
            + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
        )
    return matches, freed


def _execute_quietly(strategy: Any) -> list[str]:
    """Run huggingface_hub's delete strategy; return the failures it would only have logged
    as warnings (with tracebacks) instead of raising."""
    with hub_log_captured() as records:
        strategy.execute()
    return [
        r.getMessage().removeprefix("Couldn't delete ")
        for r in records
        if r.levelno >= logging.WARNING
    ]


def find_cached(name: str, revision: str | None = None) -> list[CachedModel]:
    """The cached snapshots of `name` (optionally one revision); raise when there are none."""
    repo_id = expand_alias(name)
    if Path(repo_id).expanduser().is_dir():
        raise ValueError(f"model: {name} is a local folder; only Hub cache entries can be removed")
    found = [m for m in cached_models(include_all=True) if m.repo_id.lower() == repo_id.lower()]
    if revision:
        found = [m for m in found if revision in m.refs or m.commit.startswith(revision)]
    if not found:
        what = f"{repo_id} at revision {revision}" if revision else repo_id
        raise ModelNotFoundError(
            f"{what} is not in the cache ({cache_dir()}); `gptneo models list` shows what is"
        )
    return found
