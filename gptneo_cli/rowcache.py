"""A KV cache whose rows are at different positions: the scheduler's cache.

`KVCache` serves one batch that starts together: every row has the same number of steps
(left padding). Continuous batching needs rows that joined at different times, so here
each row keeps its own position, keys are stored by position (global layers: at the
position; local layers: in a ring slot, position % window), and the masks are built per
row from those positions. Rows are kept compact (rows 0..n-1 are in use) so a decode step
reads views, never copies of the whole cache: a leaving row is replaced by the last one.

One forward call either decodes one token for each of the first n rows (`begin_decode`),
or prefills a chunk of tokens for one row, or the first chunk of several new rows together
(`begin_chunk`), or verifies speculative drafts (`begin_verify`: each row's fed token and
its drafts); then `plans()` gives the masks for the model's attention and `update()`
stores and returns keys as the model asks. Masks are built only where rows differ: a
batch whose rows sit at one position decodes without any.

Drafts that verification rejects must not cost a local layer's ring a key it still needs
(a draft at position p would overwrite p - window). `KVCache` gives its ring spare slots
for that; here the ring stays the window (so plain decoding is unchanged) and a verify
call stores its local keys only at `commit`, for the positions that were kept. Global
layers store every draft at once: a key past a row's length is never read (masks stop at
the row's position) and the next real token at that position overwrites it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import AttentionPlan
from .config import GPTNeoConfig


class RowCache:
    """Keys and values of up to `rows` sequences, each at its own position."""

    def __init__(
        self,
        config: GPTNeoConfig,
        rows: int,
        *,
        capacity: int = 256,
        initial_rows: int = 4,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.kinds = list(config.attention_layers)
        self.window = config.window_size
        self.limit = config.max_position_embeddings
        self.rows = rows
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = max(1, min(capacity, self.limit))
        #: Rows and positions are allocated as they are needed (doubling), so a server
        #: allowed 64 rows does not hold 64 full-length rows while 3 run; a caller that
        #: knows its needs (generate) sizes the cache once. Local layers hold
        #: min(window, capacity) slots: below the window a position's slot is itself.
        self.allocated = min(rows, max(1, initial_rows))
        heads, dim = config.num_heads, config.head_dim
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for kind in self.kinds:
            shape = (self.allocated, heads, self._size(kind, self.capacity), dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=self.device))
        #: How many leading rows hold data, when the owner keeps count (the scheduler
        #: does): rows past it are dropped when positions grow. None: keep every row.
        self.live: int | None = None
        #: Non-zero so models that treat an empty cache as "prefill" never do here.
        self.length = 1
        self._mode = "decode"
        self._n = 0
        self._rows: list[int] = [0]
        self._lengths: list[int] = []
        self._start = 0
        self._span = 1
        self._uniform = True
        self._pos = torch.zeros(0, dtype=torch.long, device=self.device)
        # A verify call: positions [n, T], each row's first position and real tokens, and
        # the local layers' keys and values that wait for `commit`.
        self._vpos = self._pos
        self._firsts: list[int] = []
        self._counts: list[int] = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _size(self, kind: str, capacity: int) -> int:
        return min(self.window, capacity) if kind == "local" else capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ---- room ---------------------------------------------------------------------------
    def ensure(self, positions: int, rows: int = 0) -> None:
        """Make global layers hold at least `positions` positions and every layer at least
        `rows` rows (each grown by doubling; zeros, so unused keys and values are finite)."""
        if positions > self.limit:
            raise ValueError(f"{positions} positions exceed the model's {self.limit}")
        if rows > self.rows:
            raise ValueError(f"{rows} rows exceed the cache's {self.rows}")
        grow_pos = positions > self.capacity
        grow_rows = rows > self.allocated
        if not (grow_pos or grow_rows):
            return
        capacity = (
            min(self.limit, max(positions, 2 * self.capacity)) if grow_pos else (self.capacity)
        )
        allocated = min(self.rows, max(rows, 2 * self.allocated)) if grow_rows else (self.allocated)
        if grow_pos and not grow_rows and self.live is not None:
            # Longer rows: re-allocate only the rows that hold data. Rows are never freed
            # otherwise, so after a burst of 64 requests one 2000-token prompt grew all 64
            # rows to 2048 positions (9.6 GB for gpt-neo-125M in float32: a 7 s step).
            allocated = min(allocated, max(rows, self.live, 1))
        kept = min(allocated, self.keys[0].shape[0])
        for i, kind in enumerate(self.kinds):
            for store in (self.keys, self.values):
                old = store[i]
                size = self._size(kind, capacity)
                grown = old.new_zeros(allocated, old.shape[1], size, old.shape[3])
                grown[:kept, :, : old.shape[2]] = old[:kept]
                store[i] = grown
        self.capacity, self.allocated = capacity, allocated

    def copy_row(self, dst: int, src_cache: RowCache, src: int, length: int) -> None:
        """Copy the first `length` positions of row `src` of another cache into row `dst`."""
        self.ensure(length + 1, dst + 1)
        for i, kind in enumerate(self.kinds):
            held = min(self.window, length) if kind == "local" else length
            for mine, theirs in ((self.keys, src_cache.keys), (self.values, src_cache.values)):
                mine[i][dst, :, :held] = theirs[i][src, :, :held]

    def move_row(self, dst: int, src: int, length: int) -> None:
        """Row `src` takes the place of row `dst` (which is being freed)."""
        if dst == src:
            return
        for i, kind in enumerate(self.kinds):
            held = min(self.window, length) if kind == "local" else length
            for store in (self.keys, self.values):
                store[i][dst, :, :held] = store[i][src, :, :held]

    # ---- one forward call ---------------------------------------------------------------
    def begin_decode(self, positions: Sequence[int]) -> torch.Tensor:
        """Next call: one new token for each of rows 0..n-1, at `positions`; returns them
        as a LongTensor [n] on the cache's device (the model's position ids)."""
        self._mode = "decode"
        self._n = len(positions)
        low, high = min(positions), max(positions)
        self._span = high + 1
        #: Every row at the same position: no row can see a key another row cannot, so no
        #: mask is needed and keys are written with a plain slice (the common case: one row,
        #: or a batch that started together).
        self._uniform = low == high
        self._pos = torch.tensor(positions, device=self.device)
        self.ensure(self._span, self._n)
        return self._pos

    def decode_positions(self) -> torch.Tensor | None:
        """The rows' positions [n] when the announced call decodes one token for each row
        (`begin_decode`), else None: what the native step (step.py) needs to run it."""
        return self._pos if self._mode == "decode" else None

    def begin_verify(self, positions: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        """Next call: `counts[b]` tokens for each of rows 0..n-1 (the token to feed and its
        drafts), the first at `positions[b]`, right-padded to the most. Returns the position
        ids [n, T] (padding's clamped to the model's last position: its outputs are never
        read). Local layers keep nothing until `commit` says how many tokens each row kept."""
        self._mode = "verify"
        self._n = len(positions)
        self._firsts, self._counts = list(positions), list(counts)
        width = max(counts)
        first = torch.tensor(self._firsts, device=self.device)
        self._vpos = first[:, None] + torch.arange(width, device=self.device)[None]
        self._span = max(p + c for p, c in zip(positions, counts, strict=True))
        self._pending = {}
        self.ensure(self._span, self._n)
        return self._vpos.clamp(max=self.limit - 1)

    def commit(self, kept: Sequence[int]) -> None:
        """After a verify call: row b keeps its first `kept[b]` tokens; store their keys in
        the local layers' rings (the last `window` of them), never the rejected drafts'."""
        rows: list[int] = []
        steps: list[int] = []
        slots: list[int] = []
        for b, (first, count) in enumerate(zip(self._firsts, kept, strict=True)):
            for t in range(max(0, count - self.window), count):
                rows.append(b)
                steps.append(t)
                slots.append((first + t) % self.window)
        if rows:
            r = torch.tensor(rows, device=self.device)
            t = torch.tensor(steps, device=self.device)
            at = torch.tensor(slots, device=self.device)
            for layer, (k, v) in self._pending.items():
                self.keys[layer][r, :, at] = k[r, :, t]
                self.values[layer][r, :, at] = v[r, :, t]
        self._pending = {}

    def begin_chunk(
        self, rows: int | Sequence[int], start: int, lengths: Sequence[int] = ()
    ) -> None:
        """Next call: a chunk of tokens for each of `rows`, the first one at position `start`.

        Several rows go together only from position 0 (new prompts), right-padded to the
        longest: `lengths` gives each row's real token count, and only real tokens' keys are
        kept (a padding key written into a local layer's ring would overwrite a real one).
        """
        rows = [rows] if isinstance(rows, int) else list(rows)
        if len(rows) > 1 and start != 0:
            raise ValueError("several rows are prefilled together only from position 0")
        self._mode = "chunk"
        self._rows, self._start = rows, start
        self._lengths = list(lengths)
        self.ensure(0, max(rows) + 1)

    def plans(self, new: int) -> dict[str, AttentionPlan]:
        """The attention masks of each layer kind for the call announced by begin_*."""
        if self._mode == "chunk":
            self.ensure(self._start + new)
        out: dict[str, AttentionPlan] = {}
        for kind in set(self.kinds):
            local = kind == "local"
            window = self.window if local else None
            if self._mode == "chunk":
                if self._start == 0 and (not local or new <= self.window):
                    out[kind] = AttentionPlan(None, causal=new > 1, window=window)
                    continue
                keys = self._chunk_key_positions(new, local)
                queries = torch.arange(self._start, self._start + new, device=self.device)
                allowed = keys[None, :] <= queries[:, None]
                if local:
                    allowed &= keys[None, :] > queries[:, None] - self.window
                mask = allowed[None, None]  # [1, 1, T, S]
            elif self._mode == "verify":
                mask = self._verify_mask(new, local)
            elif self._uniform:
                # Every cached key is in the past and (local: the ring) inside the window.
                out[kind] = AttentionPlan(None, causal=False, window=window)
                continue
            else:
                pos = self._pos[:, None]
                if local:
                    slots = torch.arange(min(self.window, self._span), device=self.device)[None]
                    held = pos - torch.remainder(pos - slots, self.window)
                    allowed = held >= 0
                else:
                    allowed = torch.arange(self._span, device=self.device)[None] <= pos
                mask = allowed[:, None, None, :]  # [B, 1, 1, S]
            out[kind] = AttentionPlan(mask, causal=False, window=window)
        return out

    def _verify_mask(self, new: int, local: bool) -> torch.Tensor:
        """[n, 1, T, S] for a verify call. Global: the keys up to each query's position.
        Local: the ring (what each slot holds, inside the window) then the new keys."""
        queries = self._vpos[:, :, None]  # [n, T, 1]
        if not local:
            keys = torch.arange(self._span, device=self.device)[None, None]
            return (keys <= queries)[:, None]
        filled = min(self.window, max(self._firsts))
        last = torch.tensor(self._firsts, device=self.device)[:, None] - 1  # [n, 1]
        slots = torch.arange(filled, device=self.device)[None]
        held = (last - torch.remainder(last - slots, self.window))[:, None]  # [n, 1, F]
        ring = (held >= 0) & (held > queries - self.window)
        steps = torch.arange(new, device=self.device)
        own = (steps[None, :] <= steps[:, None]) & (steps[None, :] > steps[:, None] - self.window)
        own = own[None].expand(self._n, new, new)
        return torch.cat([ring, own], dim=2)[:, None]

    def _chunk_key_positions(self, new: int, local: bool) -> torch.Tensor:
        start = self._start
        if not local:
            return torch.arange(start + new, device=self.device)
        filled = min(start, self.window)
        slots = torch.arange(filled, device=self.device)
        held = start - 1 - torch.remainder(start - 1 - slots, self.window)
        return torch.cat([held, torch.arange(start, start + new, device=self.device)])

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values; return what to attend over (matches plans())."""
        # the cache may hold another dtype than the activations (a model's `cache_dtype`)
        k, v = k.to(self.dtype), v.to(self.dtype)
        local = self.kinds[layer] == "local"
        if self._mode == "decode":
            return self._update_decode(layer, local, k, v)
        if self._mode == "verify":
            return self._update_verify(layer, local, k, v)
        if len(self._rows) > 1:
            return self._update_new_rows(layer, local, k, v)
        keys, values = self.keys[layer], self.values[layer]
        row, start, new = self._rows[0], self._start, k.shape[2]
        if not local:
            keys[row, :, start : start + new] = k[0]
            values[row, :, start : start + new] = v[0]
            return keys[row : row + 1, :, : start + new], values[row : row + 1, :, : start + new]
        filled = min(start, self.window)
        attend_k = torch.cat([keys[row : row + 1, :, :filled], k], dim=2)
        attend_v = torch.cat([values[row : row + 1, :, :filled], v], dim=2)
        self._keep_ring(layer, row, start, k[0], v[0])
        return attend_k, attend_v

    def _update_decode(
        self, layer: int, local: bool, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        n = self._n
        if self._uniform:
            slot = (self._span - 1) % self.window if local else self._span - 1
            keys[:n, :, slot] = k[:, :, 0]
            values[:n, :, slot] = v[:, :, 0]
        else:
            rows = torch.arange(n, device=self.device)
            slots = torch.remainder(self._pos, self.window) if local else self._pos
            keys[rows, :, slots] = k[:, :, 0]
            values[rows, :, slots] = v[:, :, 0]
        size = min(self.window, self._span) if local else self._span
        return keys[:n, :, :size], values[:n, :, :size]

    def _update_verify(
        self, layer: int, local: bool, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        n = self._n
        if local:
            self._pending[layer] = (k, v)  # stored by commit(), for the kept tokens only
            filled = min(self.window, max(self._firsts))
            attend_k = torch.cat([keys[:n, :, :filled], k], dim=2)
            attend_v = torch.cat([values[:n, :, :filled], v], dim=2)
            return attend_k, attend_v
        for b, (first, count) in enumerate(zip(self._firsts, self._counts, strict=True)):
            keys[b, :, first : first + count] = k[b, :, :count]
            values[b, :, first : first + count] = v[b, :, :count]
        return keys[:n, :, : self._span], values[:n, :, : self._span]

    def _update_new_rows(
        self, layer: int, local: bool, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New prompts from position 0: they attend over their own keys only."""
        keys, values = self.keys[layer], self.values[layer]
        for b, (row, length) in enumerate(zip(self._rows, self._lengths, strict=True)):
            if local:
                self._keep_ring(layer, row, 0, k[b, :, :length], v[b, :, :length])
            else:
                keys[row, :, :length] = k[b, :, :length]
                values[row, :, :length] = v[b, :, :length]
        return k, v

    def _keep_ring(
        self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the last `window` of a row's new keys [H, T, D] in its local ring."""
        new = k.shape[1]
        keep = min(new, self.window)
        slots = torch.arange(start + new - keep, start + new, device=self.device) % self.window
        self.keys[layer][row][:, slots] = k[:, new - keep :]
        self.values[layer][row][:, slots] = v[:, new - keep :]

    def advance(self, new: int) -> None:
        """Called by models after a forward pass; positions are the scheduler's business."""
