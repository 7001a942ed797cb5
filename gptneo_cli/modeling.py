"""GPT-Neo in PyTorch: one model, written once, for training, reference and fast inference.

Parameter names equal the Hub checkpoint names, so checkpoints load without renaming:
`transformer.wte.weight`, `transformer.h.{i}.attn.attention.q_proj.weight`, ... Reading order:
the activations, what every class shares (loading and saving), then the model top to
bottom: MLP, attention, block, the base model, the four heads.

The linear layers are plain nn.Linear here. `gptneo_cli.fast` swaps them, after loading,
for modules that hold their weights in a faster layout (oneDNN-packed, transposed, int8);
nothing else differs between the reference and the fast model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionPlan, attend, build_plan, choose_backend
from .cache import KVCache
from .checkpoint import match_checkpoint
from .config import GPTNeoConfig
from .device import resolve_device, resolve_dtype
from .errors import ModelNotFoundError
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
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
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


class LayerCache(Protocol):
    """What attention needs from a KV cache: store a layer's new keys and values, get back
    the keys and values to attend over (KVCache; the compiled decode step's static one)."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class AttentionStep:
    """How every layer attends during one forward call, decided once for all layers.

    plans: the mask of each layer kind ("global", "local"); backend: "eager", "sdpa" or
    "flash"; cache: where keys and values go (None: no cache); key_valid: bool [B, T] of
    non-padding steps for the flash backend's prefill.
    """

    plans: dict[str, AttentionPlan]
    backend: str
    cache: LayerCache | None = None
    key_valid: torch.Tensor | None = None


M = TypeVar("M", bound="GPTNeoPreTrainedModel")


class GPTNeoPreTrainedModel(nn.Module):
    """Construction, loading and saving shared by the base model and the heads."""

    #: Names of this class's head parameters (absent from a plain causal-LM checkpoint).
    head_params: tuple[str, ...] = ()

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        self.config = config

    # ---- conveniences -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the model's (the fast path may keep another, fast.py)."""
        return self.dtype

    def base(self) -> GPTNeoModel:
        raise NotImplementedError

    @property
    def attn_implementation(self) -> str:
        """The attention backend setting: auto, eager, sdpa or flash."""
        return self.base().attn_backend

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        choose_backend(name, self.device, self.dtype)
        self.base().attn_backend = name

    def new_cache(self, batch_size: int, max_length: int, spare: int = 0) -> KVCache:
        """A preallocated KV cache for `batch_size` rows of up to `max_length` positions
        (`spare`: ring room for that many rejected draft tokens, see cache.py)."""
        return KVCache(
            self.config,
            batch_size,
            max_length,
            dtype=self.cache_dtype,
            device=self.device,
            spare=spare,
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

    # ---- loading and saving ---------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls: type[M],
        folder: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        attn: str = "auto",
        quantize: str | None = None,
        compile: bool = False,
    ) -> M:
        """Load a Hub-format model folder into this class, in eval mode.

        dtype None keeps the reference float32; "auto" picks the fastest good dtype for the
        device. device None means CPU; "auto" picks CUDA, then MPS, then CPU. `quantize`
        and `compile` belong to the fast causal LM (gptneo_cli.fast.FastCausalLM); other
        classes refuse them. Hub ids and aliases are resolved by `gptneo_cli.load`.
        """
        path = Path(folder).expanduser()
        if not path.is_dir():
            what = "a file, not a model folder" if path.exists() else "model folder not found"
            raise ModelNotFoundError(
                f"{what}: {folder} (give the folder holding config.json; gptneo_cli.load "
                "resolves Hub ids and aliases)"
            )
        config = GPTNeoConfig.from_json_file(path / "config.json")
        files = weight_files(path)
        dev = resolve_device(device) if device is not None else torch.device("cpu")
        dt = resolve_dtype(dtype, dev, quantize)
        choose_backend(attn, dev, dt)
        preflight(config, files, dt, dev, path.name or str(path), quantize)
        with torch.device("meta"):
            model = cls(config)
        model.base().attn_backend = attn
        model._load(files, dev, dt, path.name or str(path), quantize=quantize, compile=compile)
        return model.eval()

    def _load(
        self,
        files: list[Path],
        device: torch.device,
        dtype: torch.dtype,
        source: str,
        *,
        quantize: str | None,
        compile: bool,
    ) -> None:
        """Fill this meta-device skeleton from the checkpoint files (overridden by fast.py)."""
        if quantize not in (None, "none") or compile:
            raise ValueError("quantize and compile apply to the fast causal LM only")
        state: dict[str, torch.Tensor] = {}

        def keep(name: str, tensor: torch.Tensor) -> None:
            state[name] = tensor.to(device=device, dtype=dtype)

        new_head = self.match_checkpoint(iter_tensors(files, dtype), keep, source)
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

    def match_checkpoint(
        self, tensors: Any, keep: Callable[[str, Any], None], source: str
    ) -> list[str]:
        """Hand each checkpoint tensor to `keep(our_name, tensor)`; see checkpoint.py."""
        return match_checkpoint(
            self,
            tensors,
            keep,
            head_params=self.head_params,
            is_base=isinstance(self, GPTNeoModel),
            source=source,
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json and model.safetensors in the Hub's layout (no lm_head: tied)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        save_safetensors(state, folder / "model.safetensors")
        return folder


# ---- the model, top to bottom ------------------------------------------------------------


class GPTNeoMLP(nn.Module):
    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.inner_size)
        self.c_proj = nn.Linear(config.inner_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPTNeoSelfAttention(nn.Module):
    """q/k/v without bias, out_proj with bias; the backend does the unscaled attention.

    The fast path fuses q, k and v into one matrix (`qkv_proj`, one product instead of
    three) and deletes the three; the reference keeps the Hub's three.
    """

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.layer = layer
        self.kind = config.attention_layers[layer]
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.qkv_proj: nn.Module | None = None
        self.out_proj = nn.Linear(h, h, bias=True)

    def forward(self, x: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        b, t, c = x.shape
        heads, dim = self.num_heads, self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).view(b, t, 3, heads, dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (
                proj(x).view(b, t, heads, dim).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
        if step.cache is not None:
            k, v = step.cache.update(self.layer, k, v)
        # a cache held in another dtype than the activations (`cache_dtype`) sets the math's
        q, dtype = q.to(k.dtype), q.dtype
        out = attend(q, k, v, step.plans[self.kind], step.backend, step.key_valid).to(dtype)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class GPTNeoAttention(nn.Module):
    """Holds the self-attention as `.attention`, which is where the Hub's names put it."""

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        self.attention_type = config.attention_layers[layer]
        self.attention = GPTNeoSelfAttention(config, layer)

    def forward(self, x: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        return self.attention(x, step)


class GPTNeoBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTNeoConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPTNeoAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPTNeoMLP(config)

    def forward(self, x: torch.Tensor, step: AttentionStep) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step)
        return x + self.mlp(self.ln_2(x))


def _embedding(count: int, dim: int) -> nn.Embedding:
    """An embedding initialised by `init_weights` only. nn.Embedding's own init would run
    normal_ on meta tensors during loading, which imports torch._dynamo: seconds of load time."""
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


class GPTNeoModel(GPTNeoPreTrainedModel):
    """Embeddings, the stack of blocks and the final LayerNorm; returns hidden states."""

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        #: The attention backend setting (auto, eager, sdpa, flash), resolved per call.
        self.attn_backend = "auto"
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
        device, dtype = self.wpe.weight.device, self.wpe.weight.dtype  # the activations'
        backend = choose_backend(self.attn_backend, device, dtype)
        if backend == "flash" and past > 0:
            backend = "sdpa"  # flash serves prefills; a cached step runs sdpa
        window, ring = self.config.window_size, getattr(cache, "ring", None)
        step = AttentionStep(
            plans={
                kind: build_plan(kind, past, new, window, key_valid, device, ring)
                for kind in set(self.config.attention_layers)
            },
            backend=backend,
            cache=cache,
            key_valid=key_valid,
        )
        hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        x = self.run(input_ids, position_ids, step, hidden)
        if cache is not None:
            cache.advance(new)
        return GPTNeoOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if hidden is not None else None,
            cache=cache,
        )

    def run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        step: AttentionStep,
        hidden: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embeddings, blocks, final LayerNorm: the whole model body, once.

        `forward` prepares the inputs and the attention step for it; the fast path's
        compiled decode step calls it with a static-shape cache. `hidden` collects the
        input of every block and the final output when given.
        """
        x = self.wte(input_ids) + self.wpe(position_ids)
        for block in self.h:
            if hidden is not None:
                hidden.append(x)
            x = block(x, step)
        x = self.ln_f(x)
        if hidden is not None:
            hidden.append(x)
        return x

    @classmethod
    def prepare_inputs(
        cls,
        config: GPTNeoConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[int, torch.Tensor | None, torch.Tensor]:
        """Check the inputs; return (cached steps, key validity or None, position ids)."""
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

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        self.transformer = GPTNeoModel(config)
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

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        self.transformer = GPTNeoModel(config)

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

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
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

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights(self.classifier)

    def _read(
        self, out: GPTNeoOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        out.logits = self.classifier(out.last_hidden_state)


class GPTNeoForQuestionAnswering(_GPTNeoHeadModel):
    """Start and end scores for every token (extractive QA)."""

    head_params = ("qa_outputs.weight", "qa_outputs.bias")

    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights(self.qa_outputs)

    def _read(
        self, out: GPTNeoOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> None:
        start, end = self.qa_outputs(out.last_hidden_state).unbind(dim=-1)
        out.start_logits, out.end_logits = start.contiguous(), end.contiguous()
