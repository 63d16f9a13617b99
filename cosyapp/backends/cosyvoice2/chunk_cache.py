"""Per-stream state of a chunk-causal network, so that streaming can compute only the new positions.

The flow encoder and estimator are chunk-causal in streaming mode: a position sees its own chunk and every
chunk to its left (attention), and its causal convolutions see only earlier positions. Once a call has
ended on a chunk boundary, the activations of everything before that boundary are final. A `ChunkCache`
keeps, for one network and one stream, what later positions still read from that committed prefix:

- for each causal convolution, the last `kernel_size - 1` input positions before the boundary;
- for each attention layer, the keys and values of every committed position.

Modules look their state up by identity (`cache.conv_input(self, ...)`, `cache.extend_kv(self, ...)`), so
one shared model serves any number of streams, each with its own cache objects.

A call runs in three steps: `begin(new, keep)` announces `new` positions starting at `length`, of which
the first `keep` will be committed (the rest, a trailing partial chunk, is recomputed by the next call);
the forward pass reads and extends the cache; `commit()` advances `length` by `keep`.

With a `ChunkWindow` (bounded left context: an approximation of upstream, the service's default), a query
in chunk c sees the pinned positions (the prompt, which carries the voice) and chunks c - left_chunks .. c
only. The cache then drops the keys and values no later query can see: after a commit it holds the pinned
positions and the last left_chunks chunks, so its memory, and the attention cost per call, stop growing
with the length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def chunk_attention_mask(length: int, chunk_size: int, device: torch.device, start: int = 0) -> torch.Tensor:
    """Bool [length - start, length], True where query i (positions start..length-1) may attend key j
    (positions 0..length-1): j lies in i's chunk or an earlier one."""
    keys = torch.arange(length, device=device)
    queries = torch.arange(start, length, device=device)
    chunk_end = (torch.div(queries, chunk_size, rounding_mode="floor") + 1) * chunk_size
    return keys.unsqueeze(0) < chunk_end.unsqueeze(1)


@dataclass(frozen=True)
class ChunkWindow:
    """Attention visibility with a bounded left context, at one rate (tokens or mel frames): query i sees key
    j when chunk(j) <= chunk(i) and (chunk(j) >= chunk(i) - left_chunks or j < pinned)."""
    chunk_size: int
    left_chunks: int
    pinned: int  # positions [0, pinned) stay visible to every query: the prompt

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.left_chunks < 0 or self.pinned < 0:
            raise ValueError(f"invalid window {self}")

    def scaled(self, factor: int) -> "ChunkWindow":
        """The same window at `factor` times the rate (the encoder's up-sampled layers)."""
        return ChunkWindow(self.chunk_size * factor, self.left_chunks, self.pinned * factor)

    def visible(self, queries: Tensor, keys: Tensor) -> Tensor:
        """Bool [len(queries), len(keys)] for absolute positions `queries` and `keys` (1-D int tensors)."""
        query_chunk = torch.div(queries, self.chunk_size, rounding_mode="floor").unsqueeze(1)
        key_chunk = torch.div(keys, self.chunk_size, rounding_mode="floor").unsqueeze(0)
        in_window = key_chunk >= query_chunk - self.left_chunks
        return (key_chunk <= query_chunk) & (in_window | (keys < self.pinned).unsqueeze(0))

    def first_needed(self, position: int) -> int:
        """The first unpinned position that a query at `position` or later can still see."""
        return max(self.pinned, (position // self.chunk_size - self.left_chunks) * self.chunk_size)


def normalized_left_chunks(left_chunks: int | None) -> int | None:
    """A left-context setting as a window size: None for every left chunk (None or -1, like upstream's
    num_decoding_left_chunks), else the number of chunks (>= 0)."""
    if left_chunks is None or left_chunks == -1:
        return None
    if left_chunks < 0:
        raise ValueError(f"left_chunks {left_chunks}: expected -1 or None (all left chunks) or a count >= 0")
    return int(left_chunks)


class ChunkCache:
    def __init__(self, max_length: int | None = None, window: ChunkWindow | None = None) -> None:
        self.length = 0  # committed positions
        self.new = 0  # positions of the call in progress
        self.keep = 0  # of which the first `keep` get committed
        self.max_length = max_length  # attention buffers never hold more than this many positions
        self.window = window
        # Key/value positions [pinned, pinned + dropped) are gone: buffer index i holds position i below
        # `pinned` and i + dropped from there on. Always 0 without a window.
        self.dropped = 0
        self._tails: dict[nn.Module, Tensor] = {}
        self._keys: dict[nn.Module, Tensor] = {}
        self._values: dict[nn.Module, Tensor] = {}

    @property
    def held(self) -> int:
        """Committed positions whose keys and values are held."""
        return self.length - self.dropped

    def begin(self, new: int, keep: int) -> None:
        if not 0 <= keep <= new:
            raise ValueError(f"cannot commit {keep} of {new} new positions")
        if self.max_length is not None and self.held + new > self.max_length:
            raise ValueError(f"{self.held + new} positions exceed this cache's limit of {self.max_length}")
        self.new, self.keep = new, keep

    def commit(self) -> None:
        self.length += self.keep
        self.new = self.keep = 0
        if self.window is not None:
            self._drop_before(self.window.first_needed(self.length))

    def conv_input(self, conv: nn.Module, x: Tensor, context: int) -> Tensor:
        """x [B, C, new] -> [B, C, context + new]: x with the `context` positions before it prepended
        (zeros at the start of the sequence, like the causal padding), and remembers the `context`
        positions before the commit boundary for the next call."""
        tail = self._tails.get(conv)
        if tail is None:
            tail = x.new_zeros(x.size(0), x.size(1), context)
        full = torch.cat([tail, x], dim=2)
        # A copy, not a view: a view would keep the whole chunk's activations alive.
        self._tails[conv] = full[:, :, self.keep:self.keep + context].clone()
        return full

    def extend_kv(self, attention: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, H, new, D] of the new positions -> keys and values of all held positions [B, H, held + new, D]
        (every position without a window; see `key_positions`).

        Without a window the buffers grow by doubling (capped at max_length), so appending a chunk copies the
        chunk only, amortised; with one they grow to what a call needs, which stops growing. Positions past
        the commit boundary are overwritten by the next call.
        """
        end = self.held + self.new
        keys, values = self._keys.get(attention), self._values.get(attention)
        if keys is None or keys.size(2) < end:
            capacity = end
            if keys is not None and self.window is None:
                capacity = max(end, 2 * keys.size(2))
            if self.max_length is not None:
                capacity = min(capacity, self.max_length)
            keys, values = self._grown(keys, k, capacity), self._grown(values, v, capacity)
            self._keys[attention], self._values[attention] = keys, values
        keys[:, :, self.held:end] = k
        values[:, :, self.held:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def key_positions(self, device: torch.device) -> Tensor:
        """Absolute positions [held + new] of the keys `extend_kv` returns in the call in progress."""
        end = self.length + self.new
        if not self.dropped:
            return torch.arange(end, device=device)
        pinned = self.window.pinned
        return torch.cat([torch.arange(pinned, device=device), torch.arange(pinned + self.dropped, end, device=device)])

    def key_segments(self) -> list[tuple[int, int]]:
        """The keys of the call in progress as runs of consecutive positions: [(first position, count)]."""
        end = self.length + self.new
        if not self.dropped:
            return [(0, end)]
        pinned = self.window.pinned
        return [(0, pinned), (pinned + self.dropped, end - pinned - self.dropped)]

    def visible_keys(self, chunk_size: int, device: torch.device) -> Tensor:
        """Bool [new, held + new]: which keys of the call in progress each new position sees (its own chunk
        and those before it; with a window, the pinned ones and the window's)."""
        if self.window is not None:
            return self.window_mask(device)
        return chunk_attention_mask(self.length + self.new, chunk_size, device, start=self.length)

    def rows(self) -> list[tuple["ChunkCache", slice]]:
        """The cache and its batch rows (all of them): the interface of `BatchedCaches.rows`."""
        return [(self, slice(None))]

    def window_mask(self, device: torch.device) -> Tensor:
        """Bool [new, held + new]: which keys of the call in progress each new position sees (window only)."""
        queries = torch.arange(self.length, self.length + self.new, device=device)
        return self.window.visible(queries, self.key_positions(device))

    def _drop_before(self, position: int) -> None:
        """Forget the keys and values of the unpinned positions before `position`: move the ones kept
        down to just after the pinned ones."""
        dropped = position - self.window.pinned
        if dropped <= self.dropped:
            return
        pinned, src, count = self.window.pinned, self.window.pinned + dropped - self.dropped, self.length - position
        for buffers in (self._keys, self._values):
            for buffer in buffers.values():
                buffer[:, :, pinned:pinned + count] = buffer[:, :, src:src + count].clone()  # ranges may overlap
        self.dropped = dropped

    def _grown(self, buffer: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        grown = like.new_empty(like.size(0), like.size(1), capacity, like.size(3))
        if buffer is not None:
            grown[:, :, :self.held] = buffer[:, :, :self.held]
        return grown

    def clone(self) -> "ChunkCache":
        """An independent copy of the committed state (for forking a stream from a shared prompt state)."""
        if self.new:
            raise RuntimeError("clone() during a call")
        copy = ChunkCache(self.max_length, self.window)
        copy.length, copy.dropped = self.length, self.dropped
        copy._tails = {module: tail.clone() for module, tail in self._tails.items()}
        copy._keys = {module: kv[:, :, :self.held].clone() for module, kv in self._keys.items()}
        copy._values = {module: kv[:, :, :self.held].clone() for module, kv in self._values.items()}
        return copy

    def nbytes(self) -> int:
        """Device memory held, buffer capacity included."""
        tensors = [*self._tails.values(), *self._keys.values(), *self._values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class BatchedCaches:
    """The caches of several streams seen as the one cache of a batch that runs their calls together. Each
    stream may be at its own position and add its own number of new positions (`begin` each member first).

    Batch rows come in `groups` blocks of one row per stream (CFG: the conditional rows of every stream, then
    the unconditional ones). A row holds its stream's new positions first, padded to the batch's `queries`
    positions; the padding only ever sees what lies before it (causal convolutions, masked keys), so the
    positions that count are what the stream computes alone. Keys are padded to the longest row and masked
    (`visible_keys`). Every read and write goes to the members, so after the call each stream's own cache is
    exactly as if it had run alone; the price is one copy of the keys and values the call reads.
    """

    def __init__(self, members: list[ChunkCache], groups: int, queries: int) -> None:
        if any(member.new > queries for member in members):
            raise ValueError(f"a member has more than the batch's {queries} new positions")
        self.members = members
        self.groups = groups
        self.queries = queries

    def rows(self) -> list[tuple[ChunkCache, slice]]:
        """Each member and its batch rows (one per group)."""
        n = len(self.members)
        return [(member, slice(index, None, n)) for index, member in enumerate(self.members)]

    def conv_input(self, conv: nn.Module, x: Tensor, context: int) -> Tensor:
        return self._join([member.conv_input(conv, part, context)
                           for member, part in zip(self.members, self._split(x))])

    def extend_kv(self, attention: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys, values = zip(*(member.extend_kv(attention, k_part[:, :, :member.new], v_part[:, :, :member.new])
                             for member, k_part, v_part in zip(self.members, self._split(k), self._split(v))))
        length = self._keys()
        return (self._join([pad_end(part, 2, length) for part in keys]),
                self._join([pad_end(part, 2, length) for part in values]))

    def visible_keys(self, chunk_size: int, device: torch.device) -> Tensor:
        """Bool [rows, 1, queries, keys]: each member's `visible_keys` in its rows; padded keys are hidden, and a
        padded query sees the first key only (a query that sees nothing would make NaNs)."""
        parts, keys = [], self._keys()
        for member in self.members:
            visible = member.visible_keys(chunk_size, device)
            part = visible.new_zeros(self.queries, keys)
            part[:visible.size(0), :visible.size(1)] = visible
            part[visible.size(0):, 0] = True
            parts.append(part)
        return torch.stack(parts).repeat(self.groups, 1, 1).unsqueeze(1)

    def join_scores(self, parts: list[Tensor]) -> Tensor:
        """Per-member scores [groups, H, new, held + new] -> [rows, H, queries, keys], padded with zeros."""
        length = self._keys()
        return self._join([pad_end(pad_end(part, 2, self.queries), 3, length) for part in parts])

    def _keys(self) -> int:
        return max(member.held + member.new for member in self.members)

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        """[groups * n, ...] -> n views [groups, ...], one per member."""
        return x.unflatten(0, (self.groups, len(self.members))).unbind(1)

    def _join(self, parts: list[Tensor]) -> Tensor:
        """n tensors [groups, ...] -> [groups * n, ...] in batch row order."""
        return torch.stack(parts, dim=1).flatten(0, 1)


def pad_end(x: Tensor, dim: int, size: int) -> Tensor:
    """x with dimension `dim` padded with zeros at its end to `size`."""
    missing = size - x.size(dim)
    return x if not missing else F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, missing])
