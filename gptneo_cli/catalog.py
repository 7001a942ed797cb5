"""The models one can use without knowing a Hub id: the bundled ones and the aliases.

`gptneo models list` shows them next to the cache (with sizes computed from the published
configs, so nothing is downloaded to say how big a model is), and shell completion offers
them for `--model`. Never imports torch: completion runs it on every Tab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import GPTNeoConfig
from .hub import ALIASES, BUNDLED_DIR, cache_dir

#: The published EleutherAI configs (what differs from GPTNeoConfig's defaults).
KNOWN_CONFIGS = {
    "EleutherAI/gpt-neo-125M": {
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "attention_types": [[["global", "local"], 6]],
    },
    "EleutherAI/gpt-neo-1.3B": {
        "hidden_size": 2048,
        "num_layers": 24,
        "num_heads": 16,
        "attention_types": [[["global", "local"], 12]],
    },
    "EleutherAI/gpt-neo-2.7B": {
        "hidden_size": 2560,
        "num_layers": 32,
        "num_heads": 20,
        "attention_types": [[["global", "local"], 16]],
    },
}
#: The Hub repos store float32 weights.
STORED_BYTES_PER_PARAMETER = 4


@dataclass(frozen=True)
class Offer:
    """A model one can name: a bundled folder, or an alias of a Hub repo."""

    name: str
    """What to pass to --model (an alias, or the bundled model's name)."""
    repo_id: str | None
    parameters: int | None
    size: int | None
    """Bytes on disk (bundled) or to download (an alias: float32 weights)."""
    bundled: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "id": self.repo_id,
            "parameters": self.parameters,
            "size": self.size,
            "bundled": self.bundled,
        }


def bundled_models() -> list[Offer]:
    """The models shipped inside the package (the demo model `tiny`)."""
    offers = []
    if not BUNDLED_DIR.is_dir():
        return offers
    for folder in sorted(BUNDLED_DIR.iterdir()):
        if not (folder / "config.json").is_file():
            continue
        try:
            parameters = GPTNeoConfig.from_json_file(folder / "config.json").num_parameters()
        except Exception:  # noqa: BLE001 - a damaged bundled config still gets listed
            parameters = None
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        offers.append(Offer(folder.name, None, parameters, size, bundled=True))
    return offers


def alias_offers() -> list[Offer]:
    """Each alias with the size of its published config."""
    offers = []
    for alias, repo_id in ALIASES.items():
        known = KNOWN_CONFIGS.get(repo_id)
        parameters = GPTNeoConfig(**known).num_parameters() if known else None
        size = parameters * STORED_BYTES_PER_PARAMETER if parameters else None
        offers.append(Offer(alias, repo_id, parameters, size, bundled=False))
    return offers


def cached_repo_ids(cache: Path | None = None) -> list[str]:
    """Repo ids in the Hub cache, from its folder names alone (fast enough for every Tab)."""
    try:
        names = [p.name for p in (cache or cache_dir()).iterdir() if p.is_dir()]
    except OSError:
        return []
    return sorted(
        n[len("models--") :].replace("--", "/") for n in names if n.startswith("models--")
    )


def model_completions(incomplete: str) -> list[tuple[str, str]]:
    """(value, help) pairs for --model: bundled models, aliases, then cached repo ids."""
    found = [(o.name, "bundled demo model") for o in bundled_models()]
    found += [(o.name, o.repo_id or "") for o in alias_offers()]
    found += [(repo, "in the cache") for repo in cached_repo_ids()]
    typed = incomplete.lower()
    seen: set[str] = set()
    out = []
    for value, help_text in found:
        if value.lower().startswith(typed) and value not in seen:
            seen.add(value)
            out.append((value, help_text))
    return out
