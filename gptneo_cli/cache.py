"""The KV cache: preallocated once, written in place, never concatenated per step.

Global layers keep every step (capacity = max_length). Local layers keep only the last
`window_size` steps in a ring buffer: step s lives in slot s % ring, so their memory stops
growing at the window. Attention does not care about key order, only about the mask, and
`attention.build_plan` knows which step each slot holds.

Speculative decoding feeds k drafted tokens at once and may take them back (`truncate`).
Its cache is made with `spare=k`: the ring holds window + k slots, so a rejected draft can
only have overwritten steps that already left the window of every later query.
"""

from __future__ import annotations

import torch

from .config import GPTNeoConfig


class KVCache:
    """Keys and values for every layer of one batch, plus which steps are padding."""

    def __init__(
        self,
        config: GPTNeoConfig,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        spare: int = 0,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's "
                f"{config.max_position_embeddings} positions"
            )
        self.max_length = max_length
        self.window = config.window_size
        #: Slots of a local layer's ring: the window, plus room for rejected drafts.
        self.ring = min(self.window + max(spare, 0), max_length)
        self.kinds = list(config.attention_layers)
        self.length = 0
        #: bool [B, max_length], True for real tokens; None while no padding has been seen.
        self.key_valid: torch.Tensor | None = None
        shape = (batch_size, config.num_heads, 0, config.head_dim)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for kind in self.kinds:
            capacity = self.ring if kind == "local" else max_length
            size = (*shape[:2], capacity, shape[3])
            self.keys.append(torch.zeros(size, dtype=dtype, device=device))
            self.values.append(torch.zeros(size, dtype=dtype, device=device))

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def record_padding(self, new_valid: torch.Tensor | None, new: int) -> torch.Tensor | None:
        """Store the validity of `new` incoming steps; return validity for all steps so far."""
        past = self.length
        if new_valid is not None and self.key_valid is None and not bool(new_valid.all()):
            self.key_valid = torch.ones(
                self.batch_size, self.max_length, dtype=torch.bool, device=new_valid.device
            )
        if self.key_valid is None:
            return None
        if new_valid is None:
            self.key_valid[:, past : past + new] = True
        else:
            self.key_valid[:, past : past + new] = new_valid
        return self.key_valid[:, : past + new]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of `layer` and return the keys/values to attend over.

        The order of what is returned matches `attention.build_plan` for the same kind.
        """
        past, new = self.length, k.shape[2]
        if past + new > self.max_length:
            raise ValueError(
                f"the KV cache holds {self.max_length} positions; {past} used, {new} more asked"
            )
        keys, values = self.keys[layer], self.values[layer]
        # the cache may hold another dtype than the activations (a model's `cache_dtype`)
        k, v = k.to(keys.dtype), v.to(values.dtype)
        if self.kinds[layer] == "global":
            keys[:, :, past : past + new] = k
            values[:, :, past : past + new] = v
            return keys[:, :, : past + new], values[:, :, : past + new]

        capacity = keys.shape[2]
        if new == 1:
            slot = past % capacity
            keys[:, :, slot] = k[:, :, 0]
            values[:, :, slot] = v[:, :, 0]
            filled = min(past + 1, capacity)
            return keys[:, :, :filled], values[:, :, :filled]
        if past == 0:
            attend_k, attend_v = k, v
        else:
            filled = min(past, capacity)
            attend_k = torch.cat([keys[:, :, :filled], k], dim=2)
            attend_v = torch.cat([values[:, :, :filled], v], dim=2)
        # Keep the last `capacity` new steps, each in slot step % capacity.
        keep = min(new, capacity)
        slots = torch.arange(past + new - keep, past + new, device=k.device) % capacity
        keys[:, :, slots] = k[:, :, new - keep :]
        values[:, :, slots] = v[:, :, new - keep :]
        return attend_k, attend_v

    def advance(self, new: int) -> None:
        """Called once per forward pass, after every layer has stored its keys."""
        self.length += new

    def truncate(self, length: int) -> None:
        """Forget every step from `length` on (rejected drafts). Global layers just stop
        reading them; a local layer's ring has `spare` extra slots, so what the dropped
        steps overwrote was already outside the window of any later query."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} steps to {length}")
        self.length = length

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (finished rows stop costing work)."""
        index = index.to(self.keys[0].device)
        self.keys = [t.index_select(0, index) for t in self.keys]
        self.values = [t.index_select(0, index) for t in self.values]
        if self.key_valid is not None:
            self.key_valid = self.key_valid.index_select(0, index)
