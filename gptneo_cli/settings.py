"""User settings: command-line flags > GPTNEO_* environment variables > TOML file > defaults.

The file is flat TOML in the user config dir (``gptneo info`` prints the path), e.g.::

    model = "125m"
    dtype = "bfloat16"
    threads = 2          # or "auto" (the default: the free cores, see gptneo_cli.threads)
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

from .options import GENERATION, OptionError, option
from .threads import check_threads

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
    "threads": (int, None),  # CPU threads; None = the free-core rule (gptneo_cli.threads)
    "api_key": (str, None),  # `gptneo serve`: the key clients must send (GPTNEO_API_KEY)
}
_CHAT: dict[str, tuple[type, Any]] = {
    "system": (str, None),
    "user_prefix": (str, "User:"),
    "assistant_prefix": (str, "Assistant:"),
    "chat_template": (str, None),  # `gptneo serve`: a built-in name or a file (see conversation)
    "history_file": (str, None),
}


def generation_keys() -> tuple[str, ...]:
    """The generation options that are settings (gptneo_cli.options.GENERATION decides)."""
    return tuple(opt.name for opt in GENERATION if opt.setting)


def keys() -> dict[str, tuple[type, Any]]:
    """Every settings key -> (type, default). Generation options default to None: "let the
    library decide" (their own default applies)."""
    gen = {opt.name: (opt.kind, None) for opt in GENERATION if opt.setting}
    return {**_MODEL, **gen, **_CHAT}


# Environment variables that are not settings keys but still shape behaviour.
EXTRA_ENV = ("GPTNEO_CONFIG", "GPTNEO_DEBUG", "GPTNEO_KERNEL", "GPTNEO_NATIVE")


def user_config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user config folder: XDG on Linux, Application Support on macOS, APPDATA on
    Windows."""
    return _platform_dir(environ, "XDG_CONFIG_HOME", Path.home() / ".config")


def user_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user data folder (chat history lives here)."""
    return _platform_dir(environ, "XDG_DATA_HOME", Path.home() / ".local" / "share")


def user_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user cache folder (measured kernel choices live here): XDG_CACHE_HOME on
    Linux, ~/Library/Caches on macOS, LOCALAPPDATA on Windows."""
    if sys.platform == "win32":
        base = environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / APP_NAME / "cache"
    if sys.platform == "darwin" and not environ.get("XDG_CACHE_HOME"):
        return Path.home() / "Library" / "Caches" / APP_NAME
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / APP_NAME


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
        if key not in keys():
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
    """Read the TOML file and GPTNEO_* variables. Bad values raise ValueError naming the source.

    The default file may be absent; a file named by GPTNEO_CONFIG must exist (a typo in it
    would otherwise silently give the defaults).
    """
    path = config_path(environ)
    known = keys()
    values = {key: default for key, (_, default) in known.items()}
    sources = {key: "default" for key in known}
    file_found = path.is_file()
    if not file_found and environ.get("GPTNEO_CONFIG"):
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ValueError(f"GPTNEO_CONFIG names {path}, which {what}")
    if file_found:
        for key, value in _read_file(path, known).items():
            values[key] = value
            sources[key] = f"file {path}"
    env: dict[str, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        env[name] = raw
        key = name[len(ENV_PREFIX) :].lower()
        if key in known and raw != "":
            values[key] = _parse_env(name, raw, key, known[key][0])
            sources[key] = f"env {name}"
    return Settings(values=values, sources=sources, path=path, file_found=file_found, env=env)


def _read_file(path: Path, known: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from exc
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            names = ", ".join(known)
            raise ValueError(f"unknown key {key!r} in config file {path}; known keys: {names}")
        where = f"{key} in {path}"
        if key in generation_keys():
            out[key] = _checked(where, lambda value=value, key=key: option(key).check(value))
        elif key == "threads":
            out[key] = check_threads(value, where)
        else:
            out[key] = _check_type(where, value, known[key][0])
    return out


def _checked(where: str, check: Any) -> Any:
    """Run an option's check; its error names `where` (the file or variable) instead."""
    try:
        return check()
    except OptionError as exc:
        problem = str(exc).split(" ", 1)[1]  # "<name> must be ..., got ..."
        raise ValueError(f"{where} {problem}") from None


def _check_type(where: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _parse_env(name: str, raw: str, key: str, kind: type) -> Any:
    if key in generation_keys():
        return _checked(name, lambda: option(key).parse(raw))
    if key == "threads":
        return check_threads(raw, name)
    return raw
