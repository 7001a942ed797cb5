"""GPTNeoConfig: read and validate a Hub config.json.

Only the fields that change the computation are kept; everything else in config.json
is preserved in `extra` so that a config can be written back without loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .jsonfiles import read_json

#: Activations transformers accepts for GPT-Neo (its ACT2FN names) that we implement: all
#: but prelu and xielu, which carry weights of their own that GPT-Neo checkpoints lack.
ACTIVATIONS = (
    "gelu_new",
    "gelu_fast",
    "gelu_accurate",
    "gelu_pytorch_tanh",
    "gelu_python_tanh",
    "gelu",
    "gelu_python",
    "gelu_10",
    "quick_gelu",
    "relu",
    "relu2",
    "relu6",
    "leaky_relu",
    "silu",
    "swish",
    "hardswish",
    "mish",
    "tanh",
    "sigmoid",
    "sqrtsoftplus",
    "laplace",
    "linear",
)

ATTENTION_KINDS = ("global", "local")


def expand_attention_types(attention_types: list) -> list[str]:
    """Turn `[[["global", "local"], 6]]` into one entry per layer."""
    layers: list[str] = []
    try:
        for kinds, repeat in attention_types:
            for _ in range(int(repeat)):
                layers.extend(kinds)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            "attention_types must look like [[['global', 'local'], 6]], got "
            f"{_shown(attention_types)}"
        ) from exc
    return layers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _label_id(value: object, what: str) -> int:
    """A label id: an integer, or (JSON object keys are strings) its decimal text."""
    if _is_int(value):
        return int(value)  # type: ignore[call-overload]
    if isinstance(value, str) and len(value) < 20:
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"config.json: every {what} must be an integer label id, got {_shown(value)}")


def _label_name(value: object) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"config.json: a label name must be text, got {_shown(value)}")
    return str(value)


def _shown(value: object, limit: int = 60) -> str:
    """A value for an error line: its repr, cut short (a config value may be huge or deep)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a too deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class GPTNeoConfig:
    """The architecture of one GPT-Neo checkpoint."""

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int | None = None
    window_size: int = 256
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    attention_types: list = field(default_factory=lambda: [[["global", "local"], 12]])
    attention_layers: list[str] = field(default_factory=list)
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    id2label: dict[int, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)
    num_labels: int = 2
    torch_dtype: str | None = None
    model_type: str = "gpt_neo"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values -------------------------------------------------------------
    @property
    def inner_size(self) -> int:
        """MLP width: intermediate_size, or 4 x hidden when it is null."""
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self, head: str = "causal_lm") -> int:
        """Parameter count from the shapes alone (lm_head is tied, so not counted)."""
        h, inner, n = self.hidden_size, self.inner_size, self.num_layers
        per_layer = 2 * 2 * h + 3 * h * h + h * h + h + h * inner + inner + inner * h + h
        total = self.vocab_size * h + self.max_position_embeddings * h + n * per_layer + 2 * h
        extra = {
            "causal_lm": 0,
            "base": 0,
            "sequence_classification": h * self.num_labels,
            "token_classification": h * self.num_labels + self.num_labels,
            "question_answering": 2 * h + 2,
        }
        return total + extra.get(head, 0)

    # ---- validation -----------------------------------------------------------------
    def validate(self) -> None:
        """Refuse what would build a wrong or unbuildable model, each with one clear line."""
        if self.model_type != "gpt_neo":
            raise ConfigError(
                f"not a GPT-Neo model: config.json has model_type {self.model_type!r}, "
                "expected 'gpt_neo'"
            )
        self._check_sizes()
        self._check_numbers()
        self._check_layers()
        self._check_labels()

    def _check_sizes(self) -> None:
        for name in (
            "vocab_size",
            "max_position_embeddings",
            "hidden_size",
            "num_layers",
            "num_heads",
            "window_size",
            "num_labels",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(
                    f"config.json: {name} must be a positive integer, got {_shown(value)}"
                )
        if self.intermediate_size is not None and (
            not _is_int(self.intermediate_size) or self.intermediate_size < 1
        ):
            raise ConfigError(
                "config.json: intermediate_size must be a positive integer or "
                f"null, got {_shown(self.intermediate_size)}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config.json: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )

    def _check_numbers(self) -> None:
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            # 0 or less divides by zero (or by a negative variance: NaN) in every LayerNorm
            raise ConfigError(
                "config.json: layer_norm_epsilon must be a small positive "
                f"number such as 1e-05, got {_shown(eps)}"
            )
        self.layer_norm_epsilon = float(eps)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ConfigError(
                    f"config.json: {name} must be a token id (an integer >= 0) "
                    f"or null, got {_shown(value)}"
                )
        if not isinstance(self.activation_function, str) or (
            self.activation_function not in ACTIVATIONS
        ):
            raise ConfigError(
                f"config.json: unsupported activation_function {_shown(self.activation_function)}"
            )
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(
                f"config.json: torch_dtype must be a name such as 'float32', "
                f"got {_shown(self.torch_dtype)}"
            )

    def _check_layers(self) -> None:
        expanded = expand_attention_types(self.attention_types)
        if self.attention_layers and list(self.attention_layers) != expanded:
            raise ConfigError(
                "config.json: attention_layers does not match the expansion of attention_types"
            )
        self.attention_layers = expanded
        bad = sorted({str(kind) for kind in expanded} - set(ATTENTION_KINDS))
        if bad:
            raise ConfigError(f"config.json: unknown attention type(s) {bad}; use global/local")
        if len(expanded) != self.num_layers:
            raise ConfigError(
                f"config.json: attention_types expand to {len(expanded)} layers "
                f"but num_layers is {self.num_layers}"
            )

    def _check_labels(self) -> None:
        if not isinstance(self.id2label, dict) or not isinstance(self.label2id, dict):
            raise ConfigError("config.json: id2label and label2id must be JSON objects")
        if self.id2label:
            self.id2label = {
                _label_id(k, "id2label key"): _label_name(v) for k, v in self.id2label.items()
            }
            self.num_labels = len(self.id2label)
        if not self.label2id and self.id2label:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.label2id = {
            _label_name(k): _label_id(v, "label2id value") for k, v in self.label2id.items()
        }
        if not self.id2label:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    # ---- (de)serialisation ----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTNeoConfig:
        data = dict(data)
        model_type = data.get("model_type")
        if model_type != "gpt_neo":
            raise ConfigError(
                f"not a GPT-Neo model: config.json has model_type {model_type!r}, "
                "expected 'gpt_neo'"
            )
        # transformers 5 writes `dtype`, older versions `torch_dtype`.
        if "torch_dtype" not in data and "dtype" in data:
            data["torch_dtype"] = data.pop("dtype")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "num_labels" not in kwargs and "id2label" in kwargs:
            kwargs["num_labels"] = len(kwargs["id2label"])
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:
            raise ConfigError(f"config.json: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> GPTNeoConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {path.parent}")
        data = read_json(path, ConfigError)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return {**extra, **data}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path
