"""Resolve: what a model name means ("125m" | "org/name" | ./folder | tiny), where the Hub
cache is, and which files of a repo gptneo needs. No network here."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import HubError, ModelNotFoundError
from ..paths import name_problem
from ..tokenizer import TOKENIZER_FILES

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"

#: Short names for the EleutherAI checkpoints (matched case-insensitively).
ALIASES = {
    "125m": "EleutherAI/gpt-neo-125M",
    "1.3b": "EleutherAI/gpt-neo-1.3B",
    "2.7b": "EleutherAI/gpt-neo-2.7B",
}

#: Models shipped inside the package (gptneo_cli/data/<name>/), e.g. the demo model "tiny".
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data"

CONFIG_FILE = "config.json"
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
    """ "1.3b" -> "EleutherAI/gpt-neo-1.3B"; any other name is returned unchanged."""
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
        raise ModelNotFoundError(
            f"{text} is a file, not a model folder: pass the folder holding config.json"
        )
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
        f"{text!r} is not a model folder, a Hub id (org/name) or an alias ({', '.join(ALIASES)})"
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
            raise HubError(
                f"{index_file.name} lists the shard {name!r}, which {problem}: a "
                "checkpoint may only name files inside its own folder"
            )
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


def has_parts(folder: Path, parts: Iterable[str], *, tokenizer_required: bool = False) -> bool:
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
