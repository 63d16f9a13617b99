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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChunkCache:
    def __init__(self, max_length: int | None = None) -> None:
        self.length = 0  # committed positions
        self.new = 0  # positions of the call in progress
        self.keep = 0  # of which the first `keep` get committed
        self.max_length = max_length  # attention buffers never grow past this many positions
        self._tails: dict[nn.Module, Tensor] = {}
        self._keys: dict[nn.Module, Tensor] = {}
        self._values: dict[nn.Module, Tensor] = {}

    def begin(self, new: int, keep: int) -> None:
        if not 0 <= keep <= new:
            raise ValueError(f"cannot commit {keep} of {new} new positions")
        if self.max_length is not None and self.length + new > self.max_length:
            raise ValueError(f"{self.length + new} positions exceed this cache's limit of {self.max_length}")
        self.new, self.keep = new, keep

    def commit(self) -> None:
        self.length += self.keep
        self.new = self.keep = 0

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
        """k, v [B, H, new, D] of the new positions -> keys and values of all positions [B, H, length + new, D].

        The buffers grow by doubling (capped at max_length), so appending a chunk copies the chunk only,
        amortised. Positions past the commit boundary are overwritten by the next call.
        """
        end = self.length + self.new
        keys, values = self._keys.get(attention), self._values.get(attention)
        if keys is None or keys.size(2) < end:
            capacity = end if keys is None else max(end, 2 * keys.size(2))
            if self.max_length is not None:
                capacity = min(capacity, self.max_length)
            keys, values = self._grown(keys, k, capacity), self._grown(values, v, capacity)
            self._keys[attention], self._values[attention] = keys, values
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def _grown(self, buffer: Tensor | None, like: Tensor, capacity: int) -> Tensor:
        grown = like.new_empty(like.size(0), like.size(1), capacity, like.size(3))
        if buffer is not None:
            grown[:, :, :self.length] = buffer[:, :, :self.length]
        return grown

    def clone(self) -> "ChunkCache":
        """An independent copy of the committed state (for forking a stream from a shared prompt state)."""
        if self.new:
            raise RuntimeError("clone() during a call")
        copy = ChunkCache(self.max_length)
        copy.length = self.length
        copy._tails = {module: tail.clone() for module, tail in self._tails.items()}
        copy._keys = {module: kv[:, :, :self.length].clone() for module, kv in self._keys.items()}
        copy._values = {module: kv[:, :, :self.length].clone() for module, kv in self._values.items()}
        return copy

    def nbytes(self) -> int:
        """Device memory held, buffer capacity included."""
        tensors = [*self._tails.values(), *self._keys.values(), *self._values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
