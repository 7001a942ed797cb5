"""User settings: command-line flags > GPTNEO_* environment variables > TOML file > defaults.

The file is flat TOML in the user config dir (``gptneo info`` prints the path), e.g.::

    model = "125m"
    dtype = "bfloat16"
    temperature = 0.7
    max_new_tokens = 200

Every key has an environment variable with the same name upper-cased and prefixed
(``GPTNEO_TEMPERATURE=0.7``). This module knows nothing about the CLI so the Python API and
the commands read the same values.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ENV_PREFIX = "GPTNEO_"
APP_NAME = "gptneo"

# key -> (type, default). None as a default means "let the library decide".
_MODEL: dict[str, tuple[type, Any]] = {
    "model": (str, None),
    "revision": (str, None),
    "device": (str, "auto"),
    "dtype": (str, "auto"),
    "attn": (str, "auto"),
    "api_key": (str, None),  # `gptneo serve`: the key clients must send (GPTNEO_API_KEY)
}
# GenerationConfig fields of the same name, shared by `generate` and `chat`.
_GENERATION: dict[str, tuple[type, Any]] = {
    "max_new_tokens": (int, None),
    "temperature": (float, None),
    "top_k": (int, None),
    "top_p": (float, None),
    "min_p": (float, None),
    "typical_p": (float, None),
    "repetition_penalty": (float, None),
    "presence_penalty": (float, None),
    "frequency_penalty": (float, None),
    "no_repeat_ngram_size": (int, None),
    "seed": (int, None),
}
_CHAT: dict[str, tuple[type, Any]] = {
    "system": (str, None),
    "user_prefix": (str, "User:"),
    "assistant_prefix": (str, "Assistant:"),
    "history_file": (str, None),
}
KEYS: dict[str, tuple[type, Any]] = {**_MODEL, **_GENERATION, **_CHAT}
GENERATION_KEYS = tuple(_GENERATION)

# Environment variables that are not settings keys but still shape behaviour.
EXTRA_ENV = ("GPTNEO_CONFIG", "GPTNEO_DEBUG")


def user_config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user config folder: XDG on Linux, Application Support on macOS, APPDATA on
    Windows."""
    return _platform_dir(environ, "XDG_CONFIG_HOME", Path.home() / ".config")


def user_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user data folder (chat history lives here)."""
    return _platform_dir(environ, "XDG_DATA_HOME", Path.home() / ".local" / "share")


def _platform_dir(environ: Mapping[str, str], xdg_var: str, xdg_default: Path) -> Path:
    if sys.platform == "win32":
        base = environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / APP_NAME
    if sys.platform == "darwin" and not environ.get(xdg_var):
        return Path.home() / "Library" / "Application Support" / APP_NAME
    return Path(environ.get(xdg_var) or xdg_default) / APP_NAME


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """GPTNEO_CONFIG when set, else config.toml in the user config dir."""
    override = environ.get("GPTNEO_CONFIG")
    return Path(override).expanduser() if override else user_config_dir(environ) / "config.toml"


def default_history_file(environ: Mapping[str, str] = os.environ) -> Path:
    return user_data_dir(environ) / "chat_history"


@dataclass
class Settings:
    """Merged env + file + default values, with where each one came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    path: Path
    file_found: bool
    env: dict[str, str] = field(default_factory=dict)

    def get(self, key: str, flag: Any = None) -> Any:
        """A flag given on the command line (not None) wins over everything else."""
        if key not in KEYS:
            raise KeyError(key)
        return flag if flag is not None else self.values.get(key)

    def model(self, flag: str | None = None) -> str:
        """The model to load: flag > GPTNEO_MODEL > file > the project's default model."""
        value = self.get("model", flag)
        if value:
            return value
        from .hub import DEFAULT_MODEL

        return DEFAULT_MODEL


def load_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """Read the TOML file and GPTNEO_* variables. Bad values raise ValueError naming the source."""
    path = config_path(environ)
    values = {key: default for key, (_, default) in KEYS.items()}
    sources = {key: "default" for key in KEYS}
    file_found = path.is_file()
    if file_found:
        for key, value in _read_file(path).items():
            values[key] = value
            sources[key] = f"file {path}"
    env: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        env[name] = raw
        key = name[len(ENV_PREFIX) :].lower()
        if key in KEYS and raw != "":
            values[key] = _parse_env(name, raw, KEYS[key][0])
            sources[key] = f"env {name}"
    return Settings(values=values, sources=sources, path=path, file_found=file_found, env=env)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            known = ", ".join(KEYS)
            raise ValueError(f"unknown key {key!r} in config file {path}; known keys: {known}")
        out[key] = _check_type(f"{key} in {path}", value, KEYS[key][0])
    return out


def _check_type(where: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where} must be {_kind_name(kind)}, got {value!r}")
    return value


def _parse_env(name: str, raw: str, kind: type) -> Any:
    if kind is str:
        return raw
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {_kind_name(kind)}, got {raw!r}") from None


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string"}[kind]
