"""Turn a model name ("125m" | "org/name" | ./folder) into a local folder.

Downloads go through huggingface_hub into the standard Hugging Face cache, so models a
user already fetched with transformers are reused and HF_HOME, HF_HUB_CACHE, HF_TOKEN,
HF_HUB_OFFLINE and HF_ENDPOINT all work as users expect. Only what gptneo needs is
fetched: config.json, the tokenizer files and one set of weights (safetensors when the
repo has them, .bin otherwise), never the flax/rust/tf/onnx copies that GPT-Neo repos
also carry. Every failure becomes a one-line GPTNeoError that says what to do.

huggingface_hub is imported inside the functions that use it, so resolving a local
folder (and `gptneo --help`) never pays for it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import GPTNeoConfig
from .errors import ConfigError, GPTNeoError, HubError, ModelNotFoundError
from .paths import name_problem

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"

#: Short names for the EleutherAI checkpoints (matched case-insensitively).
ALIASES = {
    "125m": "EleutherAI/gpt-neo-125M",
    "1.3b": "EleutherAI/gpt-neo-1.3B",
    "2.7b": "EleutherAI/gpt-neo-2.7B",
}

#: Models shipped inside the package (gptneo_cli/data/<name>/), e.g. the demo model "tiny".
BUNDLED_DIR = Path(__file__).resolve().parent / "data"

OFFLINE_HINT = "or use --model tiny, the bundled demo model that needs no network"

CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"

#: Parts of a repo that `fetch` can be asked for.
PARTS = ("config", "tokenizer", "weights")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---- naming -------------------------------------------------------------------------
def default_model() -> str:
    """The model used when none is named: $GPTNEO_MODEL, else gpt-neo-125M."""
    return os.environ.get("GPTNEO_MODEL", "").strip() or DEFAULT_MODEL


def expand_alias(name: str) -> str:
    """"1.3b" -> "EleutherAI/gpt-neo-1.3B"; any other name is returned unchanged."""
    return ALIASES.get(name.strip().lower(), name.strip())


@dataclass(frozen=True)
class ModelRef:
    """What a user-given model name points at: a local folder or a Hub repo."""

    name: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


def parse_model_name(name: str | os.PathLike[str], revision: str | None = None) -> ModelRef:
    """Classify `name` as a local folder, a bundled model, an alias or a Hub id.

    An existing folder wins over a Hub id of the same spelling, as in transformers. A
    revision means nothing for a folder and is ignored there (GPTNEO_REVISION may be set
    for Hub models while a folder is named on the command line).
    """
    text = os.fspath(name).strip()
    if not text:
        raise ValueError("model: the name is empty; give a Hub id, an alias or a folder")
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelRef(text, path=path)
    if path.exists():
        raise ModelNotFoundError(f"{text} is a file, not a model folder: pass the folder holding "
                                 "config.json")
    bundled = BUNDLED_DIR / text
    if "/" not in text and (bundled / CONFIG_FILE).is_file():
        return ModelRef(text, path=bundled)
    if text.lower() in ALIASES:
        return ModelRef(text, repo_id=ALIASES[text.lower()], revision=revision)
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        raise ModelNotFoundError(f"model folder not found: {text}")
    if _REPO_ID_RE.match(text):
        return ModelRef(text, repo_id=text, revision=revision)
    raise ModelNotFoundError(
        f"{text!r} is not a model folder, a Hub id (org/name) or an alias "
        f"({', '.join(ALIASES)})"
    )


# ---- where the cache is ---------------------------------------------------------------
def cache_dir() -> Path:
    """The Hub cache folder in force (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/...)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it at import."""
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


# ---- choosing files -----------------------------------------------------------------
def select_weights(files: Iterable[str]) -> list[str]:
    """The weight files to fetch from a repo listing: safetensors first, .bin as fallback.

    A sharded checkpoint returns its index file only; its shards are named inside it.
    """
    names = set(files)
    for candidate in (SAFETENSORS_INDEX, SAFETENSORS, PYTORCH_BIN_INDEX, PYTORCH_BIN):
        if candidate in names:
            return [candidate]
    return []


def shards_from_index(index_file: Path) -> list[str]:
    """The shard file names listed in a *.index.json weight map."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise HubError(f"cannot read the weight index {index_file}: {exc}") from exc
    for name in names:  # never download, or look for, a file outside the repo
        problem = name_problem(name)
        if problem is not None:
            raise HubError(f"{index_file.name} lists the shard {name!r}, which {problem}: a "
                           "checkpoint may only name files inside its own folder")
    return names


def weights_present(folder: Path) -> bool:
    """True when `folder` holds a complete set of weights (all shards of an index)."""
    for index in (SAFETENSORS_INDEX, PYTORCH_BIN_INDEX):
        if (folder / index).is_file():
            try:
                shards = shards_from_index(folder / index)
            except HubError:
                return False
            return all((folder / shard).is_file() for shard in shards)
    return (folder / SAFETENSORS).is_file() or (folder / PYTORCH_BIN).is_file()


def _has_parts(folder: Path, parts: Iterable[str], *, tokenizer_required: bool = False) -> bool:
    """Whether a cached snapshot holds what is asked for: config, and weights if wanted.

    Tokenizer files are checked only when asked (`tokenizer_required`): not every repo
    ships them, so offline a snapshot without them is still served and the tokenizer
    loader says what is missing.
    """
    if not (folder / CONFIG_FILE).is_file():
        return False
    if "weights" in parts and not weights_present(folder):
        return False
    if tokenizer_required and "tokenizer" in parts:
        return any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json"))
    return True


def plan_files(listing: Iterable[str], parts: Iterable[str] = PARTS) -> list[str]:
    """The files of a repo listing that gptneo fetches for `parts`, in download order.

    A sharded checkpoint contributes its index here; the shards it names come after it
    is downloaded.
    """
    names = set(listing)
    wanted = [CONFIG_FILE] if CONFIG_FILE in names else []
    if "tokenizer" in parts:
        wanted += [name for name in TOKENIZER_FILES if name in names]
    if "weights" in parts:
        wanted += select_weights(names)
    return wanted


# ---- fetching -----------------------------------------------------------------------
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
        if cached is not None and _has_parts(cached, parts, tokenizer_required=True):
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
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True,
                                      timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - sorted into network trouble vs. answers
        if _is_network_error(exc) or _http_status(exc) in _RETRYABLE_STATUS:
            raise _NetworkTrouble(_short_reason(exc)) from exc
        raise _hub_error(exc, repo_id, revision) from exc
    if not info.sha:
        raise HubError(f"{endpoint()} sent no commit id for {repo_id}: is HF_ENDPOINT a Hub?")
    listing = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    return listing, info.sha


def _download(repo_id: str, revision: str, commit: str, listing: dict[str, int | None],
              parts: set[str]) -> Snapshot:
    from huggingface_hub import hf_hub_download

    if CONFIG_FILE not in listing:
        raise ModelNotFoundError(f"{repo_id} has no config.json at revision {revision}: it is not "
                                 "a transformers model repo")
    current = CONFIG_FILE
    cache = cache_dir()

    def get(filename: str, rev: str) -> Path:
        nonlocal current
        current = filename
        with hub_log_captured():  # its retry lines would come before our one error line
            return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=cache,
                                        tqdm_class=_progress_bar(filename)))

    try:
        # The config comes first, by branch name so the cache records the ref (offline use
        # of "main" needs it), and is checked before any large file is fetched.
        folder = get(CONFIG_FILE, revision).parent
        _check_gpt_neo(folder / CONFIG_FILE, repo_id)
        wanted = plan_files(listing, parts)
        if "weights" in parts:
            if not select_weights(listing):
                raise ModelNotFoundError(f"{repo_id} has no PyTorch weights (model.safetensors or "
                                         f"pytorch_model.bin) at revision {revision}")
            if wanted[-1].endswith(".index.json"):
                wanted += shards_from_index(get(wanted[-1], commit))
        missing = [name for name in wanted if not (folder / name).is_file()]
        _check_disk_space(repo_id, cache, sum(listing.get(name) or 0 for name in missing))
        for name in missing:
            get(name, commit)
    except GPTNeoError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one actionable line
        raise _hub_error(exc, repo_id, revision, current) from exc
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
        raise ConfigError(f"{repo_id}: {exc}; gptneo runs GPT-Neo checkpoints such as "
                          f"{DEFAULT_MODEL}") from exc


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
    why = ("HF_HUB_OFFLINE is set" if reason is None
           else f"the Hub at {endpoint()} cannot be reached: {reason}")
    fix = ("unset HF_HUB_OFFLINE to download it" if reason is None
           else "check your network connection and try again")
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise HubError(f"{repo_id} (revision {revision}) is not in the cache ({cache_dir()}) and "
                       f"{why}; {fix}, {OFFLINE_HINT}")
    if not _has_parts(snapshot, parts):
        raise HubError(f"{repo_id} is only partly downloaded in {snapshot} and {why}; {fix} to "
                       "finish the download")
    return Snapshot(snapshot, repo_id, revision, snapshot.name)


# ---- errors -----------------------------------------------------------------------
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS failure, timeout, offline mode: the Hub never answered."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # huggingface_hub 1.x/2.x uses httpx(2); 0.x used requests. Only look at what is loaded.
    for module_name, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                               ("requests", ("ConnectionError", "Timeout"))):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        module = getattr(module, "exceptions", module)
        for class_name in names:
            cls = getattr(module, class_name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    return False


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _hub_error(exc: BaseException, repo_id: str, revision: str,
               filename: str | None = None) -> GPTNeoError:
    """One actionable line for anything that went wrong while talking to the Hub."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _http_status(exc)
    has_token = _token_present()
    if isinstance(exc, GatedRepoError):
        return HubError(f"{repo_id} is a gated model: accept its conditions at "
                        f"{endpoint()}/{repo_id} and set HF_TOKEN to a token of that account")
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(f"revision {revision!r} does not exist in {repo_id}: use a "
                                  "branch, tag or commit id of that repo")
    if isinstance(exc, RepositoryNotFoundError) and status != 401:
        return ModelNotFoundError(f"{repo_id} was not found on the Hub (404): check the name, e.g. "
                                  f"{DEFAULT_MODEL} or an alias ({', '.join(ALIASES)})")
    if status == 401 or isinstance(exc, RepositoryNotFoundError):
        if has_token:
            return HubError(f"{repo_id}: access denied (401) with the token in HF_TOKEN: check "
                            "the token and the model name")
        return HubError(f"{repo_id} was not found or is private (401): check the name, or set "
                        "HF_TOKEN to a token that can read it")
    if status == 403:
        return HubError(f"{repo_id}: access forbidden (403): set HF_TOKEN to a token of an "
                        "account that has access to this model")
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no file {filename} at revision {revision}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return HubError(f"the disk is full: cannot store {repo_id} in {cache_dir()}; free some "
                        "space or set HF_HUB_CACHE to a folder on a bigger disk")
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"{repo_id} is not fully in the cache and HF_HUB_OFFLINE is set; unset "
                        f"HF_HUB_OFFLINE to download it, {OFFLINE_HINT}")
    if status is not None and status >= 500:
        return HubError(f"the Hub answered {status} for {repo_id}: try again later, "
                        f"{OFFLINE_HINT}")
    if filename is not None and filename != CONFIG_FILE and (
        _is_network_error(exc) or isinstance(exc, LocalEntryNotFoundError)
        or "Consistency check failed" in str(exc)
    ):
        return HubError(f"the download of {filename} from {repo_id} was cut off "
                        f"({_short_reason(exc)}); run the command again to finish it (files "
                        "already downloaded are kept)")
    if _is_network_error(exc) or isinstance(exc, LocalEntryNotFoundError):
        return HubError(f"{repo_id} is not in the cache and the Hub at {endpoint()} cannot be "
                        f"reached ({_short_reason(exc)}); check your network connection, "
                        f"{OFFLINE_HINT}")
    if status is not None:
        return HubError(f"the Hub answered {status} for {repo_id}: {_short_reason(exc)}")
    return HubError(f"cannot fetch {repo_id}: {_short_reason(exc)}")


def _token_present() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # noqa: BLE001 - a broken token file only means "no token"
        return False


# ---- the cache: list, inspect, remove ----------------------------------------------
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
        raise HubError(f"cannot read the Hub cache {cache}: {_short_reason(exc)}") from exc
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
            models.append(CachedModel(
                repo_id=repo.repo_id,
                commit=rev.commit_hash,
                refs=tuple(sorted(rev.refs)),
                folder=rev.snapshot_path,
                size_on_disk=rev.size_on_disk,
                config=config,
                complete=weights_present(rev.snapshot_path),
            ))
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
        raise HubError(f"cannot remove {name} from the cache: {locked[0]} is read-only "
                       "(permission denied); nothing was removed")
    failures = _execute_quietly(strategy)
    if failures:
        raise HubError(f"could not remove all of {name} from the cache: {failures[0]}"
                       + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    return matches, freed


def _execute_quietly(strategy: Any) -> list[str]:
    """Run huggingface_hub's delete strategy; return the failures it would only have logged
    as warnings (with tracebacks) instead of raising."""
    with hub_log_captured() as records:
        strategy.execute()
    return [r.getMessage().removeprefix("Couldn't delete ") for r in records
            if r.levelno >= logging.WARNING]


@contextlib.contextmanager
def hub_log_captured() -> Iterator[list[logging.LogRecord]]:
    """Keep huggingface_hub's own log lines (retries, "Trying to resume download...",
    failures it only warns about) off stderr: gptneo reports the outcome in one line."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("huggingface_hub")
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [Collect()], False
    try:
        yield records
    finally:
        logger.handlers, logger.propagate = handlers, propagate


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
        raise ModelNotFoundError(f"{what} is not in the cache ({cache_dir()}); "
                                 "`gptneo models list` shows what is")
    return found


# ---- describing a model -------------------------------------------------------------
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


def format_bytes(n: int | None) -> str:
    """1536 -> "1.5 KB" (decimal units, like the Hub's web pages)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """125198592 -> "125.2M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
