"""Error translation: whatever huggingface_hub raises (or logs) becomes one actionable
GPTNeoError line."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
from collections.abc import Iterator

from ..errors import GPTNeoError, HubError, ModelNotFoundError
from .names import ALIASES, CONFIG_FILE, DEFAULT_MODEL, cache_dir, endpoint

#: Answers that mean "the Hub is busy": treated like no answer (the cache may serve).
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}

#: The way out when the Hub cannot help, in the library's words and the CLI's.
_OFFLINE_HINT = "or load the bundled demo model 'tiny', which needs no network"
_OFFLINE_HINT_CLI = "or use --model tiny, the bundled demo model that needs no network"


def offline_error(problem: str) -> HubError:
    """A HubError for `problem` (a sentence ending in a fix), plus the offline way out."""
    return HubError(f"{problem}, {_OFFLINE_HINT}", cli=f"{problem}, {_OFFLINE_HINT_CLI}")


def is_network_error(exc: BaseException) -> bool:
    """Connection refused, DNS failure, timeout, offline mode: the Hub never answered."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    # huggingface_hub 1.x/2.x uses httpx(2); 0.x used requests. Only look at what is loaded.
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        module = getattr(module, "exceptions", module)
        for class_name in names:
            cls = getattr(module, class_name, None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    return False


def http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def hub_error(
    exc: BaseException, repo_id: str, revision: str, filename: str | None = None
) -> GPTNeoError:
    """One actionable line for anything that went wrong while talking to the Hub: first
    what the Hub refused (names, access), then what broke on the way (disk, network)."""
    return (
        _refused(exc, repo_id, revision, filename)
        or _broken(exc, repo_id, filename)
        or HubError(f"cannot fetch {repo_id}: {short_reason(exc)}")
    )


def _refused(
    exc: BaseException, repo_id: str, revision: str, filename: str | None
) -> GPTNeoError | None:
    """The Hub answered, and the answer was no: gated, missing, denied."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = http_status(exc)
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated model: accept its conditions at "
            f"{endpoint()}/{repo_id} and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision {revision!r} does not exist in {repo_id}: use a "
            "branch, tag or commit id of that repo"
        )
    if isinstance(exc, RepositoryNotFoundError) and status != 401:
        return ModelNotFoundError(
            f"{repo_id} was not found on the Hub (404): check the name, e.g. "
            f"{DEFAULT_MODEL} or an alias ({', '.join(ALIASES)})"
        )
    if status == 401 or isinstance(exc, RepositoryNotFoundError):
        return _unauthorized(repo_id)
    if status == 403:
        return HubError(
            f"{repo_id}: access forbidden (403): set HF_TOKEN to a token of an "
            "account that has access to this model"
        )
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return ModelNotFoundError(f"{repo_id} has no file {filename} at revision {revision}")
    return None


def _unauthorized(repo_id: str) -> HubError:
    if _token_present():
        return HubError(
            f"{repo_id}: access denied (401) with the token in HF_TOKEN: check "
            "the token and the model name"
        )
    return HubError(
        f"{repo_id} was not found or is private (401): check the name, or set "
        "HF_TOKEN to a token that can read it"
    )


def _broken(exc: BaseException, repo_id: str, filename: str | None) -> GPTNeoError | None:
    """Something failed on the way: the disk, offline mode, the server, the network."""
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled

    status = http_status(exc)
    unreachable = is_network_error(exc) or isinstance(exc, LocalEntryNotFoundError)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return HubError(
            f"the disk is full: cannot store {repo_id} in {cache_dir()}; free some "
            "space or set HF_HUB_CACHE to a folder on a bigger disk"
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return offline_error(
            f"{repo_id} is not fully in the cache and HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to download it"
        )
    if status is not None and status >= 500:
        return offline_error(f"the Hub answered {status} for {repo_id}: try again later")
    if (
        filename is not None
        and filename != CONFIG_FILE
        and (unreachable or "Consistency check failed" in str(exc))
    ):
        return HubError(
            f"the download of {filename} from {repo_id} was cut off "
            f"({short_reason(exc)}); run the command again to finish it (files "
            "already downloaded are kept)"
        )
    if unreachable:
        return offline_error(
            f"{repo_id} is not in the cache and the Hub at {endpoint()} cannot "
            f"be reached ({short_reason(exc)}); check your network connection"
        )
    if status is not None:
        return HubError(f"the Hub answered {status} for {repo_id}: {short_reason(exc)}")
    return None


def _token_present() -> bool:
    try:
        from huggingface_hub import get_token

        return bool(get_token())
    except Exception:  # noqa: BLE001 - a broken token file only means "no token"
        return False


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
