"""CosyVoice3's flow estimator: upstream's DiT (`cosyvoice/flow/DiT`), a diffusion transformer predicting the
flow velocity for x [B, 80, T] given mu, the prompt mel `cond`, the speaker vector and the time t.

  t -> sinusoidal(256, x1000) -> Linear -> SiLU -> Linear                                  (time_embed)
  proj(x ++ cond ++ mu ++ spks) + causal grouped-conv position embedding                    (input_embed)
  depth x [AdaLayerNormZero(t) -> attention (+ rotary) -> gate, LayerNorm(t-modulated) -> GELU FF -> gate]
  AdaLayerNormZero_Final(t) -> proj_out

Upstream quirks kept for parity: the rotary embedding (dim_head wide, x-transformers' interleaved pairs) is
applied to the full q/k projections BEFORE they are split into heads, so only head 0 gets positions; the final
norm's modulation chunks are (scale, shift), the blocks' (shift, scale, gate, ...). Attention is full, or with
`streaming` a chunk mask of `static_chunk_size` frames where every chunk sees itself and all earlier ones.
Parameter names are those of the official `flow.pt` (`decoder.estimator.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.cosyvoice2.chunk_cache import ChunkWindow, chunk_attention_mask
from cosyapp.backends.cosyvoice2.estimator import timestep_features
from cosyapp.backends.cosyvoice3.config import DiTConfig

NORM_EPS = 1e-6
ROTARY_BASE = 10000.0


class TimeEmbedding(nn.Module):
    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, dim]."""
        return self.time_mlp(timestep_features(t, self.freq_dim).to(t.dtype))


class DiTCache:
    """What the DiT needs of the frames before a call's to compute that call's frames alone: every layer's keys
    and values, and the last kernel - 1 inputs of both position convs. Valid with the chunk mask only, when
    earlier frames never attend to later ones; one per Euler step (their inputs differ).

    With a `window` (bounded left context, see cosyvoice2/chunk_cache.py) a frame sees the pinned prompt
    frames and its own and the window's chunks only, and after each call the keys and values no later frame
    can see are dropped: the attention cost and memory per call stop growing with the utterance."""

    def __init__(self, window: ChunkWindow | None = None) -> None:
        self.length = 0  # frames held
        self.keys: list[torch.Tensor] = []  # per layer [B, heads, kept frames, dim_head]
        self.values: list[torch.Tensor] = []
        self.conv_inputs: list[torch.Tensor | None] = [None, None]  # [B, dim, kernel - 1] per position conv
        self.window = window
        # Frames [pinned, pinned + dropped) are gone from keys/values (always 0 without a window).
        self.dropped = 0

    def fork(self, window: ChunkWindow | None = None) -> "DiTCache":
        """An independent copy with `window` (the held tensors are shared: calls replace them, never write into
        them). Only a cache that has dropped nothing can take a window."""
        if self.dropped:
            raise ValueError("a cache that has dropped frames cannot be forked")
        other = DiTCache(window)
        other.length, other.keys, other.values = self.length, list(self.keys), list(self.values)
        other.conv_inputs = list(self.conv_inputs)
        return other

    def key_positions(self, end: int, device: torch.device) -> torch.Tensor:
        """Absolute frame positions of the keys held once a call has appended frames up to `end`."""
        positions = torch.arange(end, device=device)
        if not self.dropped:
            return positions
        pinned = self.window.pinned
        return positions[(positions < pinned) | (positions >= pinned + self.dropped)]

    def attention_mask(self, new: int, device: torch.device, chunk_size: int) -> torch.Tensor:
        """Bool [1, 1, new, keys] of a call appending `new` frames: the chunk mask, windowed when set."""
        if self.window is None:
            return chunk_attention_mask(self.length + new, chunk_size, device, self.length)[None, None]
        queries = torch.arange(self.length, self.length + new, device=device)
        return self.window.visible(queries, self.key_positions(self.length + new, device))[None, None]

    def trim(self) -> None:
        """Drop the keys/values of frames that no frame from `length` on can see (window only)."""
        if self.window is None:
            return
        pinned = self.window.pinned
        gone = self.window.first_needed(self.length) - pinned - self.dropped
        if gone <= 0:
            return
        for store in (self.keys, self.values):
            for layer, held in enumerate(store):
                store[layer] = torch.cat([held[:, :, :pinned], held[:, :, pinned + gone:]], dim=2)
        self.dropped += gone

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a call's keys/values [B, heads, T, dim_head] to the layer's; returns all of them."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


class CausalConvPositionEmbedding(nn.Module):
    """Two grouped convs, each left-padded to stay causal and followed by Mish."""

    def __init__(self, dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor, cache: DiTCache | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; with `cache`, x follows the cached frames."""
        h = x.transpose(1, 2)
        for i, conv in enumerate((self.conv1, self.conv2)):
            history = None if cache is None else cache.conv_inputs[i]
            h = F.pad(h, (self.kernel_size - 1, 0)) if history is None else torch.cat([history, h], dim=2)
            if cache is not None:
                cache.conv_inputs[i] = h[:, :, -(self.kernel_size - 1):]
            h = conv(h)
        return h.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * config.mel_dim + config.mu_dim + config.spk_dim, config.dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(config.dim, config.conv_pos_kernel, config.conv_pos_groups)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
                cache: DiTCache | None = None) -> torch.Tensor:
        """x, cond, mu [B, T, C]; spks [B, C] -> [B, T, dim]."""
        spks = spks.unsqueeze(1).expand(-1, x.size(1), -1)
        h = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        return self.conv_pos_embed(h, cache) + h


class RotaryEmbedding(nn.Module):
    """x-transformers' rotary embedding: angle t * inv_freq[i] on the interleaved channel pair (2i, 2i + 1)."""

    def __init__(self, dim_head: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, dim_head, 2).float() / dim_head))
        self.register_buffer("inv_freq", inv_freq)  # persistent: flow.pt holds it

    def forward(self, length: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, dim_head] of positions start..start + length - 1."""
        positions = torch.arange(start, start + length, device=self.inv_freq.device).float()
        angles = positions[:, None] * self.inv_freq[None]
        angles = angles.repeat_interleave(2, dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) channels of x [B, T, C] by position; the rest pass unchanged."""
    width = cos.size(-1)
    head, rest = x[..., :width], x[..., width:]
    pairs = head.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return torch.cat([head * cos + rotated * sin, rest], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: tuple[DiTCache, int] | None = None) -> torch.Tensor:
        """x [B, T, dim]; mask bool [B or 1, 1, T, keys] (True = may attend); `cache` (cache, layer index): the
        keys start with the cached frames'."""
        batch, length, _ = x.shape
        q = apply_rotary(self.to_q(x), *rope)  # before the head split: upstream's quirk (head 0 only)
        k = apply_rotary(self.to_k(x), *rope)
        v = self.to_v(x)
        q, k, v = (z.view(batch, length, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache[0].attend(cache[1], k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.to_out(y.transpose(1, 2).reshape(batch, length, -1))
        if cache is not None:
            return y
        # Upstream zeroes the rows its mask's last query row cannot see (padding; none in inference).
        return y.masked_fill(~mask[:, 0, -1].unsqueeze(-1), 0.0)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        # Index 1 is upstream's dropout slot (inactive in inference); indices keep flow.pt's key names.
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x)


class AdaLayerNorm(nn.Module):
    """Linear(SiLU(t)) -> `chunks` modulation vectors, and a LayerNorm without affine parameters."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim * chunks)
        self.chunks = chunks

    def modulation(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(t)).unsqueeze(1).chunk(self.chunks, dim=-1)

    @staticmethod
    def norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS) * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.attn_norm = AdaLayerNorm(config.dim, 6)
        self.attn = Attention(config.dim, config.heads, config.dim_head)
        self.ff = FeedForward(config.dim, config.ff_mult)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: tuple[DiTCache, int] | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm.modulation(t)
        x = x + gate_msa * self.attn(AdaLayerNorm.norm(x, scale_msa, shift_msa), mask, rope, cache)
        return x + gate_mlp * self.ff(AdaLayerNorm.norm(x, scale_mlp, shift_mlp))


class FinalNorm(AdaLayerNorm):
    def __init__(self, dim: int) -> None:
        super().__init__(dim, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(t)  # upstream's order here: scale first
        return self.norm(x, scale, shift)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        self.time_embed = TimeEmbedding(config.freq_embed_dim, config.dim)
        self.input_embed = InputEmbedding(config)
        self.rotary_embed = RotaryEmbedding(config.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.norm_out = FinalNorm(config.dim)
        self.proj_out = nn.Linear(config.dim, config.mel_dim)

    def attention_mask(self, mask: torch.Tensor, streaming: bool) -> torch.Tensor:
        """Frame mask [B, 1, T] -> bool [B, 1, T, T]: key padding, and with `streaming` the chunk mask."""
        keys = mask.bool()
        if not streaming:
            return keys.unsqueeze(2).expand(-1, -1, keys.size(-1), -1)
        chunks = chunk_attention_mask(keys.size(-1), self.config.static_chunk_size, keys.device)
        return (chunks & keys).unsqueeze(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, streaming: bool = False, cache: DiTCache | None = None) -> torch.Tensor:
        """x, mu, cond [B, 80, T]; mask [B or 1, 1, T]; t [B]; spks [B, 80] -> velocity [B, 80, T].

        With `cache` (chunk mask only; no padding) the T frames follow the cached ones, which they attend to;
        the cache then holds them too.
        """
        start = 0 if cache is None else cache.length
        t = self.time_embed(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks, cache)
        rope = self.rotary_embed(h.size(1), start)
        if cache is None:
            attn_mask = self.attention_mask(mask, streaming)
        else:
            if not streaming:
                raise ValueError("a DiT cache needs the chunk mask (streaming=True)")
            attn_mask = cache.attention_mask(h.size(1), h.device, self.config.static_chunk_size)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, t, attn_mask, rope, None if cache is None else (cache, i))
        if cache is not None:
            cache.length += h.size(1)
            cache.trim()
        return self.proj_out(self.norm_out(h, t)).transpose(1, 2)
