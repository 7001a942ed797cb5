"""Reading a checkpoint's JSON files (config.json, tokenizer_config.json, ...) with one
wording for what goes wrong, raised as the reading module's own error class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception]) -> Any:
    """The parsed contents of `path`; unreadable, not UTF-8, not JSON or nested past
    Python's recursion limit raise `error("cannot read PATH: why")`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    except RecursionError:
        raise error(f"cannot read {path}: its JSON is nested too deeply") from None
