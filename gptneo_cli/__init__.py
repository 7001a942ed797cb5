"""gptneo: run EleutherAI's GPT-Neo models locally.

The public names are imported lazily so that `gptneo --help` and shell completion never
pay for importing torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.1.0"

# torch warns when numpy is absent; gptneo never needs numpy (it is not a dependency), so for
# the CLI and library users alike the warning would only be noise. Only that message is hidden.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

_LAZY = {
    "GPTNeoConfig": "config",
    "GPTNeoModel": "modeling",
    "GPTNeoForCausalLM": "modeling",
    "GPTNeoForSequenceClassification": "modeling",
    "GPTNeoForTokenClassification": "modeling",
    "GPTNeoForQuestionAnswering": "modeling",
    "KVCache": "cache",
    "load": "loader",
    "load_tokenizer": "loader",
    "FastCausalLM": "fast",
    "GenerationConfig": "options",
    "GenerationResult": "generation",
    "generate": "generation",
    "stream": "generation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gptneo_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
