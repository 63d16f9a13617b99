"""The S1 dual-autoregressive transformer.

A slow transformer runs once per audio frame over the token sequence (text ids, then semantic frames); its
pre-final-norm hidden state seeds a small fast transformer that runs over the codebooks of that frame
(position 0 = the slow hidden state, position k = embedding of code k-1). Both keep preallocated KV caches
with one row per concurrent stream; `forward_rows` and `fast_forward_rows` run many streams in one forward,
each over its own cache row at its own positions (the model runner's batched calls).

S1 details reproduced here (the goldens are exact about them):
* input embedding = token embedding + sum of the 10 codebook embeddings (codebook i at offset i*codebook_size),
  the codebook sum only at semantic positions, and there the whole embedding divided by sqrt(num_codebooks+1);
* per-head RMSNorm on q and k before RoPE (slow only); RoPE on interleaved pairs with a cos/sin table rounded
  to bfloat16 even when the model runs in float32; GQA by repeating each kv head for consecutive q heads;
* untied output head; the fast transformer gets the hidden state *before* the final norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyapp.backends.fish.config import LLM_FILE, DualARConfig
from cosyapp.backends.weights import check_keys, load_state_dict


def rope_table(seq_len: int, head_dim: int, base: float, device: torch.device | str | None = None) -> Tensor:
    """RoPE cos/sin `[seq_len, head_dim/2, 2]` for interleaved pairs, rounded to bf16 (as S1), held in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return table.to(torch.bfloat16).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of `x [B, T, H, D]` by `table [T, D/2, 2]` (shared by the batch) or
    `[B, T, D/2, 2]` (each row at its own positions); computed in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = table[..., 0].unsqueeze(-2), table[..., 1].unsqueeze(-2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache(nn.Module):
    """Preallocated keys/values `[rows, n_kv_heads, max_len, head_dim]`, written in place. Each concurrent
    stream owns one row for its whole request."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, row: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `k, v [1, H, S, D]` in `row` at positions start..start+S-1; return that row's filled prefix."""
        end = start + k.shape[2]
        self.k[row:row + 1, :, start:end] = k
        self.v[row:row + 1, :, start:end] = v
        return self.k[row:row + 1, :, :end], self.v[row:row + 1, :, :end]

    def write_rows(self, rows: CacheRows, positions: Tensor, k: Tensor, v: Tensor,
                   length: int) -> tuple[Tensor, Tensor]:
        """Store `k, v [B, H, S, D]`, row b at `positions[b] [S]` of cache row `rows.index[b]`; return those
        rows' first `length` positions `[B, H, length, D]`."""
        index = rows.index[:, None]
        self.k[index, :, positions] = k.transpose(1, 2)
        self.v[index, :, positions] = v.transpose(1, 2)
        return self.k[rows.view, :, :length], self.v[rows.view, :, :length]


@dataclass(frozen=True)
class CacheRows:
    """Rows of the shared KV caches that one batched call works on: `index [B]` (int64, on the cache's
    device) for writes, and `view` for reads (a slice when the rows are consecutive, so reading needs no
    gather copy; otherwise the index)."""

    index: Tensor
    view: Tensor | slice

    @classmethod
    def of(cls, rows: Sequence[int], device: torch.device | str) -> CacheRows:
        index = torch.tensor(list(rows), dtype=torch.long, device=device)
        first = rows[0]
        consecutive = list(rows) == list(range(first, first + len(rows)))
        return cls(index, slice(first, first + len(rows)) if consecutive else index)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, norm_eps: float) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = n_head, n_kv_heads, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.cache: KVCache | None = None

    def project(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`x [B, S, dim]` -> q `[B, n_head, S, head_dim]`, k and v `[B, n_kv_heads, S, head_dim]`, RoPE'd."""
        bsz, seq, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seq, self.n_head, self.head_dim)
        k = k.view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def output(self, y: Tensor) -> Tensor:
        """Attention output `[B, n_head, S, head_dim]` -> `[B, S, dim]`."""
        bsz, _, seq, _ = y.shape
        return self.wo(y.transpose(1, 2).reshape(bsz, seq, self.n_head * self.head_dim))

    def forward(self, x: Tensor, rope: Tensor, start: int | None, row: int = 0) -> Tensor:
        """`x [B, S, dim]` at positions start..start+S-1 (`rope` sliced to them). `start=None`: a full causal
        pass without the cache; otherwise (B = 1) cache row `row` is written and attended over 0..start+S-1."""
        seq = x.shape[1]
        q, k, v = self.project(x, rope)
        if start is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = self.cache.write(row, start, k, v)
            if seq == 1:  # one new query: every cached position is in its past
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            else:
                q_pos = torch.arange(start, start + seq, device=x.device)
                mask = q_pos[:, None] >= torch.arange(start + seq, device=x.device)[None, :]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.output(y)

    def forward_rows(self, x: Tensor, rope: Tensor, rows: CacheRows, positions: Tensor, mask: Tensor) -> Tensor:
        """Each batch row at its own positions over its own cache row: `x [B, S, dim]` at `positions [B, S]`
        (`rope [B, S, ...]` gathered at them) is written to `rows` and attends under `mask [B, 1, S, L]`."""
        q, k, v = self.project(x, rope)
        k, v = self.cache.write_rows(rows, positions, k, v, mask.shape[-1])
        return self.output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


class Block(nn.Module):
    def __init__(self, attention: Attention, dim: int, hidden: int, norm_eps: float) -> None:
        super().__init__()
        self.attention = attention
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: Tensor, rope: Tensor, start: int | None, row: int = 0) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start, row)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_rows(self, x: Tensor, rope: Tensor, rows: CacheRows, positions: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention.forward_rows(self.attention_norm(x), rope, rows, positions, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def causal_row_mask(positions: Tensor, length: int) -> Tensor:
    """`[B, 1, S, length]` (length > every position): query (b, s) sees the keys at positions <= positions[b, s].
    The length comes from the caller, who knows the positions on the host (no device sync here)."""
    keys = torch.arange(length, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


class DualARTransformer(nn.Module):
    def __init__(self, config: DualARConfig, semantic_begin_id: int, semantic_end_id: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.semantic_begin_id, self.semantic_end_id = semantic_begin_id, semantic_end_id
        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(
            Block(Attention(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.attention_qkv_bias, c.attention_o_bias,
                            c.attention_qk_norm, c.norm_eps), c.dim, c.intermediate_size, c.norm_eps)
            for _ in range(c.n_layer))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(
            Block(Attention(c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim,
                            c.fast_attention_qkv_bias, c.fast_attention_o_bias, c.fast_attention_qk_norm, c.norm_eps),
                  c.fast_dim, c.fast_intermediate_size, c.norm_eps)
            for _ in range(c.n_fast_layer))
        self.fast_norm = RMSNorm(c.fast_dim, c.norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the derived buffers on the parameters' device (after `to_empty`, for instance)."""
        c, device = self.config, self.output.weight.device
        self.register_buffer("rope", rope_table(c.max_seq_len, c.head_dim, c.rope_base, device), persistent=False)
        self.register_buffer("fast_rope", rope_table(c.num_codebooks, c.fast_head_dim, c.rope_base, device),
                             persistent=False)
        self.register_buffer("codebook_offsets", torch.arange(c.num_codebooks, device=device) * c.codebook_size,
                             persistent=False)

    # ---- slow transformer ----

    def embed(self, grid: Tensor) -> Tensor:
        """`grid [B, num_codebooks+1, S]` -> input embeddings `[B, S, dim]`."""
        tokens, codes = grid[:, 0], grid[:, 1:]
        x = self.embeddings(tokens)
        codebook_sum = self.codebook_embeddings(codes + self.codebook_offsets[None, :, None]).sum(dim=1)
        semantic = ((tokens >= self.semantic_begin_id) & (tokens <= self.semantic_end_id))[..., None]
        x = x + codebook_sum * semantic
        if self.config.scale_codebook_embeddings:
            x = torch.where(semantic, x / math.sqrt(self.config.num_codebooks + 1), x)
        return x

    def forward(self, grid: Tensor) -> tuple[Tensor, Tensor]:
        """Full causal pass without a cache: logits `[B, S, vocab]` and pre-norm hidden states `[B, S, dim]`."""
        seq = grid.shape[-1]
        x = self.embed(grid)
        for layer in self.layers:
            x = layer(x, self.rope[:seq], None)
        return self.output(self.norm(x)), x

    def setup_caches(self, rows: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate the slow (max_seq_len) and fast (num_codebooks) KV caches once, `rows` concurrent streams."""
        c = self.config
        max_seq_len = max_seq_len or c.max_seq_len
        dtype = dtype or self.output.weight.dtype
        device = self.output.weight.device
        for layer in self.layers:
            layer.attention.cache = KVCache(rows, c.n_local_heads, max_seq_len, c.head_dim, dtype, device)
        for layer in self.fast_layers:
            layer.attention.cache = KVCache(rows, c.fast_n_local_heads, c.num_codebooks, c.fast_head_dim, dtype, device)

    def forward_cached(self, grid: Tensor, start: int, row: int = 0) -> tuple[Tensor, Tensor]:
        """Run `grid [1, num_codebooks+1, S]` at positions start..start+S-1 through cache row `row`; returns
        the last position's logits `[1, vocab]` and pre-norm hidden state `[1, dim]`."""
        seq = grid.shape[-1]
        x = self.embed(grid)
        rope = self.rope[start:start + seq]
        for layer in self.layers:
            x = layer(x, rope, start, row)
        hidden = x[:, -1]
        return self.output(self.norm(hidden)), hidden

    def forward_rows(self, grid: Tensor, rows: CacheRows, positions: Tensor, last: Tensor,
                     length: int) -> tuple[Tensor, Tensor]:
        """Many streams at once, each through its own cache row at its own positions: `grid [B, 11, S]` at
        `positions [B, S]`, all below `length` (rows shorter than S padded at the end; padded positions write
        cache slots after the row's real ones, which the row overwrites before it reads them). Returns the
        logits `[B, vocab]` and pre-norm hidden states `[B, dim]` at index `last [B]` of each row."""
        x = self.embed(grid)
        rope, mask = self.rope[positions], causal_row_mask(positions, length)
        for layer in self.layers:
            x = layer.forward_rows(x, rope, rows, positions, mask)
        hidden = x[torch.arange(x.shape[0], device=x.device), last]
        return self.output(self.norm(hidden)), hidden

    # ---- fast transformer ----

    def fast_forward_cached(self, x: Tensor, pos: int, row: int = 0) -> Tensor:
        """One fast position: `x [1, fast_dim]` (slow hidden at pos 0, else a code embedding) -> logits
        `[1, codebook_size]`. Attends over fast positions 0..pos of this frame (earlier frames' slots are
        overwritten before they are read, which is why S1's per-frame cache zeroing is not needed)."""
        h = x[:, None]
        rope = self.fast_rope[pos:pos + 1]
        for layer in self.fast_layers:
            h = layer(h, rope, pos, row)
        return self.fast_output(self.fast_norm(h[:, 0]))

    def fast_forward_rows(self, x: Tensor, pos: int, rows: CacheRows) -> Tensor:
        """`fast_forward_cached` for many streams at the same fast position: `x [B, fast_dim]` -> logits
        `[B, codebook_size]`, cache row `rows.index[b]` for batch row b."""
        positions = torch.full((x.shape[0], 1), pos, dtype=torch.long, device=x.device)
        rope = self.fast_rope[positions]
        mask = torch.ones(x.shape[0], 1, 1, pos + 1, dtype=torch.bool, device=x.device)
        h = x[:, None]
        for layer in self.fast_layers:
            h = layer.forward_rows(h, rope, rows, positions, mask)
        return self.fast_output(self.fast_norm(h[:, 0]))

    def fast_forward(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced fast pass without a cache: `hidden [B, dim]`, `codes [B, num_codebooks]` -> logits
        `[B, num_codebooks, codebook_size]`; row k is what code k is sampled from (row 0 is unused by S1)."""
        x = torch.cat([hidden[:, None], self.fast_embeddings(codes[:, :-1])], dim=1)
        for layer in self.fast_layers:
            x = layer(x, self.fast_rope[: x.shape[1]], None)
        return self.fast_output(self.fast_norm(x))


def load_dual_ar(model_dir: str | Path, semantic_begin_id: int, semantic_end_id: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DualARTransformer:
    """Build the model from `config.json` and load `model.pth` strictly (bf16 in the release), cast to `dtype`."""
    model_dir = Path(model_dir)
    config = DualARConfig.from_model_dir(model_dir)
    path = model_dir / LLM_FILE
    state = load_state_dict(path)
    if state and all(k.startswith("model.") for k in state):  # training-checkpoint spelling
        state = {k.removeprefix("model."): v for k, v in state.items()}
    with torch.device("meta"):  # no random init of weights that are overwritten anyway
        model = DualARTransformer(config, semantic_begin_id, semantic_end_id)
    model = model.to_empty(device=device).to(dtype)
    model.reset_buffers()
    check_keys(model, state, str(path))
    return model.eval()
