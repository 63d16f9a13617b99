"""The flow's token encoder: a conformer over 25 Hz token embeddings, up-sampled to 50 Hz mel rate,
then more conformer layers (upstream `UpsampleConformerEncoder`).

Module and parameter names follow the `encoder.*` keys of the official `flow.pt`.
Streaming uses block-causal chunk masks: a position sees its own chunk and every chunk to its left.
The chunk grid starts at absolute position 0 of the sequence, prompt included.

With an `EncoderCache` (streaming only), `forward` takes just the tokens after the cached prefix: attention
reads the cached keys/values, the causal convolutions their cached left context (see chunk_cache.py). A
cache with a `ChunkWindow` also bounds the left context of every conformer layer: a position sees the
prompt and its last left_chunks chunks (25 tokens, 50 frames after up-sampling: the same chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.cosyvoice2.chunk_cache import BatchedCaches, ChunkCache, ChunkWindow, chunk_attention_mask
from cosyapp.backends.cosyvoice2.config import EncoderConfig


def relative_position_table(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ESPnet relative position embeddings, [1, 2*length-1, dim], for relative offsets +(length-1) .. -(length-1).

    Even channels hold sin(offset * freq), odd channels cos(offset * freq), freq = 10000^(-2i/dim), computed
    in float32 like upstream so the table does not depend on the model dtype.
    """
    offsets = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32).unsqueeze(1)
    freqs = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angles = offsets * freqs
    table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)
    return table.unsqueeze(0).to(dtype)


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """[..., T, 2T-1] scores against relative offsets -> [..., T, T] scores against key positions.

    Column k of the input is offset (T-1-k); key j of query i has offset i-j, i.e. column T-1-i+j.
    Prepending a zero column and re-reading the buffer with rows of length T shifts row i left by i.
    """
    *batch, t, width = scores.shape
    padded = F.pad(scores, (1, 0)).view(*batch, width + 1, t)
    return padded[..., 1:, :].reshape(*batch, t, width)[..., :t]


def relative_shift_rows(scores: torch.Tensor, keys: int) -> torch.Tensor:
    """[..., n, keys+n-1] scores of the last n of `keys` positions against offsets (keys-1) .. -(n-1)
    -> [..., n, keys] scores against key positions 0..keys-1.

    Query r sits at position keys-n+r, so key j has offset keys-n+r-j, i.e. column n-1-r+j: each row starts
    one column further left than the row above, which is a strided view with row stride width-1.
    """
    scores = scores.contiguous()
    *batch, n, width = scores.shape
    strides = scores.stride()
    return scores.as_strided((*batch, n, keys), (*strides[:-2], width - 1, 1), scores.storage_offset() + n - 1)


def scores_against_offsets(query: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """query [B, H, T, d] . offsets [1, H, n, d] -> [B, H, T, n]. Batch rows are folded into one matrix per
    head: broadcasting the shared offsets table over the batch would copy it once per row."""
    b, h, t, d = query.shape
    if b == 1:
        return query @ offsets.transpose(-2, -1)
    rows = query.transpose(0, 1).reshape(h, b * t, d)
    return (rows @ offsets[0].transpose(-2, -1)).view(h, b, t, -1).transpose(0, 1)


class LinearEmbed(nn.Module):
    """Linear -> LayerNorm -> x sqrt(dim) (upstream `LinearNoSubsampling` with rel-pos scaling)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(in_dim, dim), nn.LayerNorm(dim, eps=1e-5))
        self.scale = math.sqrt(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.scale


class RelPositionAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL style relative positions (`pos_bias_u/v`)."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        # linear_pos of the position table, [1, heads, 2L-1, head_dim]: it depends on the offset only, so
        # streams share it; grown on demand by the cached path. Not a buffer: not in flow.pt.
        self._projected_positions: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pos_table: torch.Tensor | None, mask: torch.Tensor | None,
                cache: ChunkCache | None = None) -> torch.Tensor:
        """x [B, T, D], pos_table [1, 2T-1, D], mask bool [T, T] (True = visible) or None for full attention.

        With `cache`, x holds the T positions after the cached ones, mask is the cache's `visible_keys` over the
        keys it holds (all earlier positions, or the prompt and the window: `cache.key_segments()`) and
        pos_table is unused. A `BatchedCaches` holds several streams, each at its own position.
        """
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.n_heads, self.head_dim)
        k = self.linear_k(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.extend_kv(self, k, v)
        scale = 1.0 / math.sqrt(self.head_dim)
        # The positional term enters the attention as an additive bias, scaled like the content term: one
        # fused attention call instead of separate passes (add, scale, mask, softmax) over the scores.
        query_v = ((q + self.pos_bias_v) * scale).transpose(1, 2)
        if cache is None:
            p = self.linear_pos(pos_table).view(1, -1, self.n_heads, self.head_dim).transpose(1, 2)
            bias = relative_shift(query_v @ p.transpose(-2, -1))
        else:
            parts = [self.cached_position_scores(query_v[rows, :, :member.new], member)
                     for member, rows in cache.rows()]
            bias = parts[0] if isinstance(cache, ChunkCache) else cache.join_scores(parts)
        if mask is not None:
            bias = bias.masked_fill(~mask, float("-inf"))
        query_u = (q + self.pos_bias_u).transpose(1, 2)
        out = F.scaled_dot_product_attention(query_u, k, v, attn_mask=bias, scale=scale)
        return self.linear_out(out.transpose(1, 2).reshape(b, t, -1))

    def cached_position_scores(self, query_v: torch.Tensor, cache: ChunkCache) -> torch.Tensor:
        """The positional term [B, H, new, held + new] of one stream's new queries against the keys its cache
        holds. Query r sits at cache.length + r; per run of consecutive keys from position `first`, the
        offsets run from (cache.length - first) + new - 1 down to (cache.length - first) - count + 1."""
        t = query_v.size(2)
        runs = []
        for first, count in cache.key_segments():
            distance = cache.length - first
            p = self.projected_offsets(distance + t - 1, distance - count + 1)
            runs.append(relative_shift_rows(scores_against_offsets(query_v, p), count))
        return runs[0] if len(runs) == 1 else torch.cat(runs, dim=-1)

    def projected_offsets(self, highest: int, lowest: int) -> torch.Tensor:
        """linear_pos of the position embeddings for offsets highest .. lowest (descending): [1, heads,
        highest-lowest+1, head_dim], a view into a table kept on the module and grown by doubling."""
        needed = max(highest + 1, 1 - lowest)
        table, weight = self._projected_positions, self.linear_pos.weight
        if table is None or table.device != weight.device or table.dtype != weight.dtype:
            table = None
        if table is None or table.size(2) < 2 * needed - 1:
            length = needed if table is None else max(needed, table.size(2))
            positions = relative_position_table(length, weight.size(1), weight.device, weight.dtype)
            with torch.no_grad():  # shared by every stream: never part of an autograd graph
                table = self.linear_pos(positions).view(1, -1, self.n_heads, self.head_dim).transpose(1, 2)
            table = table.contiguous()
            self._projected_positions = table
        center = (table.size(2) + 1) // 2  # index k holds offset center-1-k
        return table[:, :, center - 1 - highest:center - lowest]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden_dim)
        self.w_2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm block: x + attention(LN(x)), then x + FFN(LN(x)). No convolution module, no macaron FFN."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(dim, n_heads)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, pos_table: torch.Tensor | None, mask: torch.Tensor | None,
                cache: ChunkCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), pos_table, mask, cache)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookaheadLayer(nn.Module):
    """Lets each token see the next `lookahead` tokens: conv k=lookahead+1 over x ++ lookahead context (or zeros),
    leaky ReLU, causal conv k=3, plus the residual. Output has the length of x."""

    def __init__(self, dim: int, lookahead: int, channels: int | None = None) -> None:
        super().__init__()
        self.lookahead = lookahead
        channels = dim if channels is None else channels  # CosyVoice3 narrows the hidden width
        self.conv1 = nn.Conv1d(dim, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, dim, kernel_size=3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, cache: ChunkCache | None = None) -> torch.Tensor:
        """x [B, T, D]; context [B, <=lookahead, D] holds the embedded tokens after x, None at the end of speech.
        conv1 only looks right, so with `cache` only conv2 needs the positions before x."""
        h = x.transpose(1, 2)
        if context is not None:
            h = torch.cat([h, context.transpose(1, 2)], dim=2)
        h = F.pad(h, (0, self.lookahead + x.size(1) - h.size(2)))
        h = F.leaky_relu(self.conv1(h), negative_slope=0.01)
        left = self.conv2.kernel_size[0] - 1
        h = self.conv2(F.pad(h, (left, 0)) if cache is None else cache.conv_input(self.conv2, h, left))
        return h.transpose(1, 2) + x


class UpsampleConv(nn.Module):
    """Nearest-neighbour up-sampling by `factor`, then a causal conv (kernel 2*factor+1, left pad 2*factor)."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv1d(dim, dim, kernel_size=2 * factor + 1)

    def forward(self, x: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """x [B, D, T] -> [B, D, factor*T]; `cache` (at the up-sampled rate) holds the left context."""
        h = torch.repeat_interleave(x, self.factor, dim=2)
        left = 2 * self.factor
        return self.conv(F.pad(h, (left, 0)) if cache is None else cache.conv_input(self.conv, h, left))


@dataclass
class EncoderCache:
    """One stream's encoder state: the token-rate part (look-ahead conv, conformer layers) and the
    up-sampled frame-rate part (up-sampling conv, up conformer layers)."""
    upsample_factor: int
    tokens: ChunkCache | BatchedCaches = field(default_factory=ChunkCache)
    frames: ChunkCache | BatchedCaches = field(default_factory=ChunkCache)

    @classmethod
    def windowed(cls, upsample_factor: int, window: ChunkWindow) -> "EncoderCache":
        """Empty caches with a bounded left context; `window` at the token rate."""
        return cls(upsample_factor, ChunkCache(window=window), ChunkCache(window=window.scaled(upsample_factor)))

    @classmethod
    def batched(cls, caches: list["EncoderCache"], tokens: int) -> "EncoderCache":
        """Several streams' caches, each begun on its own call, as the cache of one batch of `tokens` positions
        per row (BatchedCaches)."""
        factor = caches[0].upsample_factor
        return cls(factor, BatchedCaches([cache.tokens for cache in caches], groups=1, queries=tokens),
                   BatchedCaches([cache.frames for cache in caches], groups=1, queries=factor * tokens))

    def begin(self, new_tokens: int, keep_tokens: int) -> None:
        self.tokens.begin(new_tokens, keep_tokens)
        self.frames.begin(self.upsample_factor * new_tokens, self.upsample_factor * keep_tokens)

    def commit(self) -> None:
        self.tokens.commit()
        self.frames.commit()

    def clone(self) -> "EncoderCache":
        return EncoderCache(self.upsample_factor, self.tokens.clone(), self.frames.clone())

    def nbytes(self) -> int:
        return self.tokens.nbytes() + self.frames.nbytes()


class UpsampleConformerEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, pre_lookahead_len: int, upsample_factor: int) -> None:
        super().__init__()
        dim = config.output_size
        self.static_chunk_size = config.static_chunk_size
        self.upsample_factor = upsample_factor
        self.embed = LinearEmbed(config.input_size, dim)
        self.pre_lookahead_layer = PreLookaheadLayer(dim, pre_lookahead_len)
        self.encoders = nn.ModuleList(
            ConformerLayer(dim, config.attention_heads, config.linear_units) for _ in range(config.num_blocks))
        self.up_layer = UpsampleConv(dim, upsample_factor)
        self.up_embed = LinearEmbed(dim, dim)
        self.up_encoders = nn.ModuleList(
            ConformerLayer(dim, config.attention_heads, config.linear_units) for _ in range(config.num_up_blocks))
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)

    def reserve_positions(self, tokens: int) -> None:
        """Project the relative positions of sequences up to `tokens` tokens now. The cached path grows each
        layer's shared table by doubling when a stream first gets that far, a one-off stall of a chunk
        (several times its cost at 512 and 1024 tokens) that this moves to load time."""
        for layer in self.encoders:
            layer.self_attn.projected_offsets(tokens - 1, 0)
        for layer in self.up_encoders:
            layer.self_attn.projected_offsets(self.upsample_factor * tokens - 1, 0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, streaming: bool = False,
                cache: EncoderCache | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, input_size] token embeddings; context [B, L, input_size] look-ahead tokens (not encoded
        themselves) or None. Returns [B, upsample_factor*T, output_size].

        With `cache` (chunk masks only; the caller brackets the call with cache.begin/commit), x holds the
        tokens after the cached ones and the result covers their frames only.
        `lengths` [B] (a batch of streams of different lengths, context None): row b holds its tokens and
        then its look-ahead tokens in its first lengths[b] positions; what follows is zeroed after the
        embedding, as the look-ahead layer pads the end of a sequence.
        """
        if cache is not None and not streaming:
            raise ValueError("an encoder cache needs streaming=True: full attention cannot reuse earlier chunks")
        token_cache, frame_cache = (cache.tokens, cache.frames) if cache is not None else (None, None)
        h = self.embed(x)
        if lengths is not None:
            h = h * (torch.arange(h.size(1), device=h.device) < lengths.unsqueeze(1)).unsqueeze(2).to(h.dtype)
        if context is not None:
            context = self.embed(context)
        h = self.pre_lookahead_layer(h, context, token_cache)
        h = self._run_layers(self.encoders, h, self.static_chunk_size if streaming else 0, token_cache)

        h = self.up_layer(h.transpose(1, 2), frame_cache).transpose(1, 2)
        h = self.up_embed(h)
        h = self._run_layers(self.up_encoders, h, self.static_chunk_size * self.upsample_factor if streaming else 0,
                             frame_cache)
        return self.after_norm(h)

    @staticmethod
    def _run_layers(layers: nn.ModuleList, h: torch.Tensor, chunk_size: int,
                    cache: ChunkCache | BatchedCaches | None = None) -> torch.Tensor:
        t = h.size(1)
        if cache is not None:
            mask = cache.visible_keys(chunk_size, h.device)
            for layer in layers:
                h = layer(h, None, mask, cache)
            return h
        pos_table = relative_position_table(t, h.size(2), h.device, h.dtype)
        mask = chunk_attention_mask(t, chunk_size, h.device) if chunk_size > 0 else None
        for layer in layers:
            h = layer(h, pos_table, mask)
        return h
