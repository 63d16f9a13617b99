"""The flow-matching velocity estimator (upstream `CausalConditionalDecoder`): a 1-D U-Net of causal
resnet blocks and transformer blocks over mel frames.

Module and parameter names follow the `decoder.estimator.*` keys of the official `flow.pt`, including
the positional indices of upstream's `nn.Sequential`s. `forward` has the signature of the released ONNX
export (x, mask, mu, t, spks, cond) and no control flow on tensor values, so it exports (and can be swapped
for a TensorRT engine) as is. With one entry in `channels` (every released config) the U-Net does not
change the time resolution: down, mid and up blocks all run at the mel frame rate.

With a `ChunkCache` (chunk masks only), `forward` takes just the frames after the cached prefix: attention
reads the cached keys/values, every causal convolution its cached left context. One cache per Euler step,
since the activations differ from step to step. A cache with a `ChunkWindow` bounds the attention's left
context (the prompt frames and the last left_chunks chunks of 50 frames stay visible) and holds only the
keys/values of those frames, so the cost of a call stops growing along the utterance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.cosyvoice2.chunk_cache import BatchedCaches, ChunkCache, chunk_attention_mask
from cosyapp.backends.cosyvoice2.config import EstimatorConfig


def timestep_features(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of the flow time t [B] -> [B, dim]: sin then cos of scale*t*freq_i,
    freq_i = 10000^(-i/(dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000.0) / (half - 1)))
    angles = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d that pads kernel_size-1 zeros on the left, so frame i sees frames <= i only.
    With `cache`, the left context is the cached end of the previous frames instead."""

    def forward(self, x: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        left = self.kernel_size[0] - 1
        return super().forward(F.pad(x, (left, 0)) if cache is None else cache.conv_input(self, x, left))


class ChannelsLast(nn.Module):
    """[B, C, T] <-> [B, T, C]; sits around the LayerNorm in `CausalBlock1D.block`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        # Indices match upstream: conv at 0, LayerNorm (over channels) at 2.
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3), ChannelsLast(), nn.LayerNorm(dim_out), ChannelsLast(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        conv, *rest = self.block
        h = conv(x * mask, cache)
        for layer in rest:
            h = layer(h)
        return h * mask


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor,
                cache: ChunkCache | None = None) -> torch.Tensor:
        h = self.block1(x, mask, cache) + self.mlp(time_emb).unsqueeze(-1)
        return self.block2(h, mask, cache) + self.res_conv(x * mask)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(n_heads * head_dim, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        """x [B, T, C]; bias additive, broadcastable to [B, heads, T, T] ([.., T, cached + T] with `cache`)."""
        b, t, _ = x.shape
        q = self.to_q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.to_k(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.extend_kv(self, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(b, t, -1))


class GeluProjection(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        # Index 1 is upstream's dropout, a no-op at inference; kept so `net.2` lines up with the checkpoint.
        self.net = nn.Sequential(GeluProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + GELU FFN (upstream `BasicTransformerBlock`; its timestep input is unused)."""

    def __init__(self, dim: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, n_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, cache: ChunkCache | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias, cache)
        return x + self.ff(self.norm3(x))


def _transformer_stack(dim: int, config: EstimatorConfig) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(dim, config.num_heads, config.attention_head_dim) for _ in range(config.n_blocks))


class CausalConditionalDecoder(nn.Module):
    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        if len(config.channels) != 1:
            raise ValueError(f"estimator channels {config.channels}: only a single-level U-Net is supported")
        dim = config.channels[0]
        time_dim = 4 * dim
        self.in_channels = config.in_channels
        self.static_chunk_size = config.static_chunk_size
        self.time_mlp = TimestepEmbedding(config.in_channels, time_dim)
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(config.in_channels, dim, time_dim), _transformer_stack(dim, config),
            CausalConv1d(dim, dim, 3)])])
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(dim, dim, time_dim), _transformer_stack(dim, config)])
            for _ in range(config.num_mid_blocks))
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(2 * dim, dim, time_dim), _transformer_stack(dim, config),
            CausalConv1d(dim, dim, 3)])])
        self.final_block = CausalBlock1D(dim, dim)
        self.final_proj = nn.Conv1d(dim, config.out_channels, 1)

    def attention_bias(self, mask: torch.Tensor, streaming: bool,
                       cache: ChunkCache | BatchedCaches | None = None) -> torch.Tensor:
        """Additive attention bias from the frame mask [B, 1, T] (B may be 1): 0 where visible, -1e10 where not
        ([B, 1, T, T] with chunk masking, else [B, 1, 1, T]). With `cache` the T frames follow the cached
        ones, all valid (the mask is not read): the cache's `visible_keys` over the keys it holds (all
        earlier frames, or with a window the prompt's and the window's, masked per query chunk), [T, keys]
        for one stream's cache, [rows, 1, T, keys] for a batch of streams at their own positions.

        `where` rather than upstream's (1 - visible) * -1e10: the same float32 values, and no 0 * inf = NaN
        when a float16 export rounds -1e10 to -inf."""
        if cache is not None:
            visible = cache.visible_keys(self.static_chunk_size, mask.device)
        else:
            visible = mask.unsqueeze(1) > 0
            if streaming:
                visible = visible & chunk_attention_mask(mask.size(-1), self.static_chunk_size, mask.device)
        return torch.where(visible, 0.0, -1.0e10).to(mask.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, streaming: bool = False, cache: ChunkCache | None = None) -> torch.Tensor:
        """x, mu, cond [B, 80, T]; mask [B, 1, T] or [1, 1, T]; t [B]; spks [B, 80] -> velocity [B, 80, T].

        `cache` (streaming only; the caller brackets the call with cache.begin/commit): the T frames follow
        the cached ones."""
        if cache is not None and not streaming:
            raise ValueError("an estimator cache needs streaming=True: full attention cannot reuse earlier chunks")
        time_emb = self.time_mlp(timestep_features(t, self.in_channels).to(t.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.size(-1)), cond], dim=1)
        bias = self.attention_bias(mask, streaming, cache)

        resnet, transformers, conv = self.down_blocks[0]
        h = self._resnet_and_attend(resnet, transformers, h, mask, time_emb, bias, cache)
        skip = h
        h = conv(h * mask, cache)
        for resnet, transformers in self.mid_blocks:
            h = self._resnet_and_attend(resnet, transformers, h, mask, time_emb, bias, cache)
        resnet, transformers, conv = self.up_blocks[0]
        h = self._resnet_and_attend(resnet, transformers, torch.cat([h, skip], dim=1), mask, time_emb, bias, cache)
        h = conv(h * mask, cache)
        h = self.final_block(h, mask, cache)
        return self.final_proj(h * mask) * mask

    @staticmethod
    def _resnet_and_attend(resnet: CausalResnetBlock1D, transformers: nn.ModuleList, h: torch.Tensor,
                           mask: torch.Tensor, time_emb: torch.Tensor, bias: torch.Tensor,
                           cache: ChunkCache | None) -> torch.Tensor:
        h = resnet(h, mask, time_emb, cache).transpose(1, 2)
        for block in transformers:
            h = block(h, bias, cache)
        return h.transpose(1, 2)
