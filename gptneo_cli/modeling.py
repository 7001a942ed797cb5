"""GPT-Neo in PyTorch: the base model and its four heads.

Parameter names equal the Hub checkpoint names, so checkpoints load without renaming:
`transformer.wte.weight`, `transformer.h.{i}.attn.attention.q_proj.weight`, ... Reading order:
MLP, attention, block, the base model, then the heads and loading.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import (
    AttentionPlan,
    build_plan,
    choose_backend,
    eager_attention,
    flash_attention,
    sdpa_attention,
)
from .cache import KVCache
from .config import GPTNeoConfig
from .device import resolve_device, resolve_dtype
from .errors import WeightsError
from .preflight import preflight
from .weights import iter_tensors, save_safetensors, weight_files

log = logging.getLogger("gptneo")

def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _laplace(x: torch.Tensor) -> torch.Tensor:
    """The Laplace activation (MEGA): a Gaussian CDF centred at 1/sqrt(2), width 0.282095."""
    return 0.5 * (1.0 + torch.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0))))


#: Every parameter-free activation transformers accepts for GPT-Neo (its ACT2FN names);
#: prelu and xielu carry weights of their own and are refused by the config.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_10": lambda x: F.gelu(x).clamp(-10.0, 10.0),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "swish": F.silu,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "laplace": _laplace,
    "linear": lambda x: x,
}


@dataclass
class GPTNeoOutput:
    """What a forward pass returns; each class fills the fields that apply to it."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: KVCache | None = None


class GPTNeoMLP(nn.Module):
    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTNeoSelfAttention(nn.Module):
    """q/k/v without bias, out_proj with bias; the backend does the unscaled attention."""

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.layer = layer
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.out_proj = nn.Linear(h, h, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        plan: AttentionPlan,
        backend: str,
        cache: KVCache | None,
        key_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        prefill = cache is None or cache.length == 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if backend == "flash" and prefill:
            out = flash_attention(q, k, v, plan, key_valid)
        elif backend == "eager":
            out = eager_attention(q, k, v, plan)
        else:
            out = sdpa_attention(q, k, v, plan)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class GPTNeoAttention(nn.Module):
    """Holds the self-attention as `.attention`, which is where the Hub's names put it."""

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        self.attention_type = config.attention_layers[layer]
        self.attention = GPTNeoSelfAttention(config, layer)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.attention(x, *args)


class GPTNeoBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTNeoAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTNeoMLP(config)

    def forward(self, x: torch.Tensor, *attn_args: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), *attn_args)
        return x + self.mlp(self.ln_2(x))


M = TypeVar("M", bound="GPTNeoPreTrainedModel")


class GPTNeoPreTrainedModel(nn.Module):
    """Construction, loading and saving shared by the base model and the heads."""

    #: Names of this class's head parameters (absent from a plain causal-LM checkpoint).
    head_params: tuple[str, ...] = ()

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__()
        self.config = config

    # ---- conveniences -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def base(self) -> GPTNeoModel:
        raise NotImplementedError

    @property
    def attn_implementation(self) -> str:
        """The attention backend setting: auto, eager, sdpa or flash."""
        return self.base()._attn

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        choose_backend(name, self.device, self.dtype)
        self.base()._attn = name

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A preallocated KV cache for `batch_size` rows of up to `max_length` positions."""
        return KVCache(
            self.config, batch_size, max_length, dtype=self.dtype, device=self.device
        )

    def init_weights(self, module: nn.Module | None = None) -> None:
        """GPT-Neo's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        std = float(self.config.extra.get("initializer_range", 0.02))
        for m in (module or self).modules():
            if getattr(m, "weight", None) is not None and m.weight.is_meta:
                continue  # built for loading: the checkpoint provides the values
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def tie_weights(self) -> None:
        """Re-point tied parameters after loading replaced them (only the causal LM ties)."""

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls: type[M],
        name_or_path: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        attn: str = "auto",
        revision: str | None = None,
    ) -> M:
        """Load a Hub-format folder (or Hub id / alias) into this class, in eval mode.

        dtype None keeps the reference float32; "auto" picks the fastest good dtype for the
        device. device None means CPU; "auto" picks CUDA, then MPS, then CPU.
        """
        from .hub import resolve_model_dir

        folder = resolve_model_dir(name_or_path, revision=revision)
        config = GPTNeoConfig.from_json_file(folder / "config.json")
        files = weight_files(folder)
        dev = resolve_device(device) if device is not None else torch.device("cpu")
        dt = resolve_dtype(dtype, dev)
        choose_backend(attn, dev, dt)
        preflight(config, files, dt, dev, folder.name or str(folder))
        with torch.device("meta"):
            model = cls(config, attn=attn)
        model._load(iter_tensors(files, dt), dev, dt, source=folder.name or str(folder))
        return model.eval()

    def _checkpoint_name(self, name: str) -> str | None:
        """Map a checkpoint tensor name to our parameter name; None means "ignore it"."""
        if name.endswith((".attn.attention.bias", ".attn.attention.masked_bias")):
            return None
        head = name.split(".", 1)[0]
        if head in _HEAD_MODULES:
            return name if head in {p.split(".", 1)[0] for p in self.head_params} else None
        is_base = isinstance(self, GPTNeoModel)
        if name.startswith("transformer."):
            return name[len("transformer."):] if is_base else name
        return name if is_base else f"transformer.{name}"

    def _match_checkpoint(
        self, tensors: Any, keep: Callable[[str, torch.Tensor], None], source: str
    ) -> list[str]:
        """Hand each checkpoint tensor to `keep(our_name, tensor)` after checking it fits.

        Raises WeightsError listing every missing, unexpected or wrongly shaped tensor.
        Returns the head parameters the checkpoint lacks (they get a random init).
        """
        expected = {name: tuple(p.shape) for name, p in self.named_parameters()}
        seen: set[str] = set()
        unexpected: list[str] = []
        wrong: list[str] = []
        wrong_dtype: list[str] = []
        for raw, tensor in tensors:
            name = self._checkpoint_name(raw)
            if name is None:
                continue
            if name not in expected:
                unexpected.append(raw)
            elif tuple(tensor.shape) != expected[name]:
                wrong.append(f"{raw} {list(tensor.shape)} (expected {list(expected[name])})")
            elif not tensor.dtype.is_floating_point:  # an edited header: bytes of another kind
                wrong_dtype.append(f"{raw} {str(tensor.dtype).removeprefix('torch.')}")
            else:
                keep(name, tensor)
            seen.add(name)  # present, even when refused: listed once, under its problem
        missing = [n for n in expected if n not in seen]
        new_head = [n for n in missing if n in self.head_params]
        missing = [n for n in missing if n not in self.head_params]
        problems = []
        if missing:
            problems.append("missing " + _listing(missing))
        if unexpected:
            problems.append("unexpected " + _listing(unexpected))
        if wrong:
            problems.append("wrongly shaped " + _listing(wrong))
        if wrong_dtype:
            problems.append("integer data for floating-point parameters in "
                            + _listing(wrong_dtype))
        if problems:
            raise WeightsError(f"checkpoint {source} does not fit: " + "; ".join(problems))
        return new_head

    def _load(self, tensors: Any, device: torch.device, dtype: torch.dtype, source: str) -> None:
        state: dict[str, torch.Tensor] = {}

        def keep(name: str, tensor: torch.Tensor) -> None:
            state[name] = tensor.to(device=device, dtype=dtype)

        new_head = self._match_checkpoint(tensors, keep, source)
        self.load_state_dict(state, strict=False, assign=True)
        if new_head:
            for module_name in sorted({n.split(".", 1)[0] for n in new_head}):
                module = getattr(self, module_name)
                module.to_empty(device=device)
                self.init_weights(module)
                module.to(dtype)
            log.warning(
                "%s has no %s weights: they were initialised randomly; train this head "
                "before trusting its outputs",
                source,
                ", ".join(new_head),
            )
        self.tie_weights()

    # ---- saving -------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json and model.safetensors in the Hub's layout (no lm_head: tied)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        save_safetensors(state, folder / "model.safetensors")
        return folder


_HEAD_MODULES = {"lm_head", "score", "classifier", "qa_outputs"}


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor(s): {shown}{more}"


def _embedding(count: int, dim: int) -> nn.Embedding:
    """An embedding initialised by `init_weights` only. nn.Embedding's own init would run
    normal_ on meta tensors during loading, which imports torch._dynamo: seconds of load time."""
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


class GPTNeoModel(GPTNeoPreTrainedModel):
    """Embeddings, the stack of blocks and the final LayerNorm; returns hidden states."""

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__(config, attn)
        self._attn = attn
        self.wte = _embedding(config.vocab_size, config.hidden_size)
        self.wpe = _embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPTNeoBlock(config, i) for i in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.init_weights()

    def base(self) -> GPTNeoModel:
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> GPTNeoOutput:
        past, key_valid, position_ids = self.prepare_inputs(
            self.config, input_ids, attention_mask, position_ids, cache
        )
        new = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(position_ids)

        backend = choose_backend(self._attn, x.device, x.dtype)
        plans = {
            kind: build_plan(kind, past, new, self.config.window_size, key_valid, x.device)
            for kind in set(self.config.attention_layers)
        }
        flash_valid = key_valid if past == 0 else None
        hidden: list[torch.Tensor] = []
        for block in self.h:
            if output_hidden_states:
                hidden.append(x)
            plan = plans[block.attn.attention_type]
            x = block(x, plan, backend, cache, flash_valid)
        x = self.ln_f(x)
        if cache is not None:
            cache.advance(new)
        if output_hidden_states:
            hidden.append(x)
        return GPTNeoOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            cache=cache,
        )

    @classmethod
    def prepare_inputs(
        cls,
        config: GPTNeoConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[int, torch.Tensor | None, torch.Tensor]:
        """Check the inputs; return (cached steps, key validity or None, position ids).

        Shared with the inference-only model in fast.py so both treat inputs alike.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        batch, new = input_ids.shape
        past = cache.length if cache is not None else 0
        limit = config.max_position_embeddings
        if past + new > limit:
            raise ValueError(
                f"input of {past + new} positions is longer than the model's {limit}; "
                "shorten the prompt or generate fewer tokens"
            )
        if new == 0:
            raise ValueError("input_ids is empty")
        key_valid = cls._key_valid(attention_mask, cache, batch, past, new)
        if position_ids is None:
            position_ids = cls._positions(key_valid, past, new, input_ids.device)
        return past, key_valid, position_ids

    @staticmethod
    def _key_valid(
        mask: torch.Tensor | None, cache: KVCache | None, batch: int, past: int, new: int
    ) -> torch.Tensor | None:
        """Bool [B, past + new] of non-padding steps, or None when nothing is padding."""
        if mask is not None:
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] not in (new, past + new):
                raise ValueError(
                    f"attention_mask must be [batch, {past + new}] (or [batch, {new}] with a "
                    f"cache), got {list(mask.shape)}"
                )
            mask = mask[:, -new:].bool()
        if cache is not None:
            return cache.record_padding(mask, new)
        if mask is None or bool(mask.all()):
            return None
        return mask

    @staticmethod
    def _positions(
        key_valid: torch.Tensor | None, past: int, new: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids count real tokens only, so left padding does not shift them."""
        if key_valid is None:
            return torch.arange(past, past + new, device=device)[None]
        counted = key_valid.long().cumsum(dim=-1) - 1
        return counted[:, -new:].clamp(min=0)


class GPTNeoForCausalLM(GPTNeoPreTrainedModel):
    """The language model: hidden states times the (tied) token embedding."""

    head_params = ()

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__(config, attn)
        self.transformer = GPTNeoModel(config, attn)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def base(self) -> GPTNeoModel:
        return self.transformer

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> GPTNeoOutput:
        """logits_to_keep=N computes logits for the last N positions only (0 = all)."""
        out = self.transformer(input_ids, attention_mask, position_ids, cache, output_hidden_states)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        out.logits = self.lm_head(hidden)
        return out


class _GPTNeoHeadModel(GPTNeoPreTrainedModel):
    """GPTNeoModel under `transformer` plus one head; `_read` turns hidden states into the
    head's outputs. Shared by the three heads whose forward takes the same inputs."""

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__(config, attn)
        self.transformer = GPTNeoModel(config, attn)

    def base(self) -> GPTNeoModel:
        return self.transformer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
    ) -> GPTNeoOutput:
        out = self.transformer(input_ids, attention_mask, position_ids, cache, output_hidden_states)
        self._read(out, input_ids, attention_mask)
        return out

    def _read(
        self, out: GPTNeoOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        raise NotImplementedError


class GPTNeoForSequenceClassification(_GPTNeoHeadModel):
    """One label score per sequence, read at its last real (non-padding) token."""

    head_params = ("score.weight",)

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__(config, attn)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.init_weights(self.score)

    def _read(
        self, out: GPTNeoOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        """With an attention_mask the last real token is found from it (left or right
        padding); otherwise, like transformers, the rightmost token that is not pad_token_id."""
        token_logits = self.score(out.last_hidden_state)
        batch, seq = input_ids.shape
        steps = torch.arange(seq, device=input_ids.device)
        if attention_mask is not None:
            real = attention_mask[:, -seq:].bool()
            last = (steps * real).argmax(dim=-1)
        elif self.config.pad_token_id is not None:
            last = (steps * (input_ids != self.config.pad_token_id)).argmax(dim=-1)
        else:
            if batch > 1:
                raise ValueError(
                    "batches need an attention_mask (or a pad_token_id in config.json) "
                    "to find each sequence's last token"
                )
            last = torch.full((batch,), seq - 1, device=input_ids.device)
        out.logits = token_logits[torch.arange(batch, device=input_ids.device), last]


class GPTNeoForTokenClassification(_GPTNeoHeadModel):
    """One label score per token."""

    head_params = ("classifier.weight", "classifier.bias")

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__(config, attn)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights(self.classifier)

    def _read(
        self, out: GPTNeoOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        out.logits = self.classifier(out.last_hidden_state)


class GPTNeoForQuestionAnswering(_GPTNeoHeadModel):
    """Start and end scores for every token (extractive QA)."""

    head_params = ("qa_outputs.weight", "qa_outputs.bias")

    def __init__(self, config: GPTNeoConfig, attn: str = "auto") -> None:
        super().__init__(config, attn)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights(self.qa_outputs)

    def _read(
        self, out: GPTNeoOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        start, end = self.qa_outputs(out.last_hidden_state).unbind(dim=-1)
        out.start_logits, out.end_logits = start.contiguous(), end.contiguous()
