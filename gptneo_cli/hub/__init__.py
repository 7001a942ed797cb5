"""Turn a model name ("125m" | "org/name" | ./folder | tiny) into a local folder, and look
after the Hugging Face cache. One job per module:

- names.py     what a name means, where the cache is, which repo files gptneo needs
- download.py  `fetch` / `resolve_model_dir`: from the cache, else from the Hub
- errors.py    huggingface_hub's exceptions and log lines turned into one actionable line
- cache.py     list, find and remove cached models (`gptneo models list/rm`)
- describe.py  a model's config, size, files and memory before downloading its weights
- units.py     sizes and counts as people read them

Downloads go through huggingface_hub into the standard Hugging Face cache, so models a
user already fetched with transformers are reused and HF_HOME, HF_HUB_CACHE, HF_TOKEN,
HF_HUB_OFFLINE and HF_ENDPOINT all work as users expect. Only what gptneo needs is
fetched: config.json, the tokenizer files and one set of weights (safetensors when the
repo has them, .bin otherwise), never the flax/rust/tf/onnx copies that GPT-Neo repos
also carry. Every failure becomes a one-line GPTNeoError that says what to do.

huggingface_hub is imported inside the functions that use it, so resolving a local
folder (and `gptneo --help`) never pays for it. Only `gptneo_cli.loader` and the CLI use
this package; the model, the tokenizer and the tasks take folders.
"""

from __future__ import annotations

from .cache import CachedModel, cached_models, find_cached, remove_cached
from .describe import DTYPE_BYTES, FileEntry, ModelSummary, describe
from .download import Snapshot, cached_snapshot, fetch, free_bytes, resolve_model_dir
from .errors import hub_log_captured
from .names import (
    ALIASES,
    BUNDLED_DIR,
    CONFIG_FILE,
    DEFAULT_MODEL,
    PARTS,
    PYTORCH_BIN,
    PYTORCH_BIN_INDEX,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    ModelRef,
    cache_dir,
    default_model,
    endpoint,
    expand_alias,
    is_offline,
    parse_model_name,
    plan_files,
    select_weights,
    shards_from_index,
    weights_present,
)
from .units import format_bytes, format_count

__all__ = [
    "ALIASES",
    "BUNDLED_DIR",
    "CONFIG_FILE",
    "DEFAULT_MODEL",
    "DTYPE_BYTES",
    "PARTS",
    "PYTORCH_BIN",
    "PYTORCH_BIN_INDEX",
    "SAFETENSORS",
    "SAFETENSORS_INDEX",
    "TOKENIZER_FILES",
    "CachedModel",
    "FileEntry",
    "ModelRef",
    "ModelSummary",
    "Snapshot",
    "cache_dir",
    "cached_models",
    "cached_snapshot",
    "default_model",
    "describe",
    "endpoint",
    "expand_alias",
    "fetch",
    "find_cached",
    "format_bytes",
    "format_count",
    "free_bytes",
    "hub_log_captured",
    "is_offline",
    "parse_model_name",
    "plan_files",
    "remove_cached",
    "resolve_model_dir",
    "select_weights",
    "shards_from_index",
    "weights_present",
]
