"""The S1 codec (a causal "modded DAC"): 44.1 kHz audio <-> 10 codebooks at 21.5 frames/s.

Encode: right-pad to a multiple of 2048 samples -> causal conv encoder (Snake residual units, strided convs,
a window-512 transformer at the end of the last block) -> latent `[C, L/512]` -> quantizer: 2 x (causal
conv k2 s2 + ConvNeXt) -> window-128 transformer -> semantic VQ (cosine nearest, 4096 entries) -> 9-stage
residual VQ (1024 entries) on what the semantic stage left. Decode: clamp a copy of the codes -> sum of
the stages' projected codebook rows -> window-128 transformer -> 2 x (causal transposed conv + ConvNeXt) ->
causal conv decoder -> tanh; `T` frames give exactly `T * 2048` samples (no trimming).

Everything on the decode path is causal, so `DecodeStream` decodes incrementally: each conv keeps its last
input samples, each transposed conv its last input frame, each attention layer the keys/values of its last
`window - 1` positions. Feeding the codes in pieces gives the same samples as one `decode` call. The states
of several utterances decode in one batch (`codec_batch`), also when they are at different positions: each
row's RoPE positions are its own and shorter attention windows are padded and masked.

Weight norm is folded at load time (both spellings in `codec.pth`); the checkpoint's persistent RoPE/mask
buffers are dropped and recomputed (the RoPE cos/sin table is rounded to bf16 like upstream's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyapp.backends.fish.config import CodecConfig, CodecTransformerConfig
from cosyapp.backends.fish.dual_ar import FeedForward, RMSNorm, apply_rope, rope_table
from cosyapp.backends.weights import check_keys, fold_weight_norm, load_state_dict

# Streaming state: module -> whatever that module carries from one chunk to the next.
StreamState = dict[nn.Module, Any]

_BUFFER_SUFFIXES = (".freqs_cis", ".causal_mask")  # persistent in S1 checkpoints; recomputed here


class Snake(nn.Module):
    """x + sin(alpha x)^2 / alpha, per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class CausalConv1d(nn.Module):
    """Conv1d that pads (k-1)*dilation + 1 - stride zeros on the left (and on the right just enough to
    complete the last stride window), so output t depends on inputs <= t*stride only."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias)
        self.stride = stride
        self.span = (kernel - 1) * dilation + 1
        self.left = self.span - stride

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        if state is None:
            length = x.shape[-1] + self.left
            n_out = math.ceil((length - self.span) / self.stride) + 1
            right = max(0, (n_out - 1) * self.stride + self.span - length)
            return self.conv(F.pad(x, (self.left, right)))
        if self.stride != 1:
            raise NotImplementedError("streaming is only needed (and supported) for stride-1 convs")
        context = state.get(self)
        if context is None:
            context = x.new_zeros(*x.shape[:-1], self.left)
        x = torch.cat([context, x], dim=-1)
        state[self] = x[..., x.shape[-1] - self.left:]
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d with the last kernel - stride outputs removed (output block t depends on inputs <= t)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride=stride)
        self.stride = stride
        self.trim = kernel - stride
        self.context_frames = -(-self.trim // stride)  # earlier input frames that reach into this chunk

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        if state is None:
            y = self.conv(x)
            return y[..., : y.shape[-1] - self.trim]
        n = x.shape[-1]
        if self.context_frames:
            context = state.get(self)
            if context is None:
                context = x.new_zeros(*x.shape[:-1], self.context_frames)
            x = torch.cat([context, x], dim=-1)
            state[self] = x[..., x.shape[-1] - self.context_frames:]
        start = self.context_frames * self.stride
        return self.conv(x)[..., start:start + n * self.stride]


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([Snake(dim), CausalConv1d(dim, dim, 7, dilation=dilation), Snake(dim),
                                    CausalConv1d(dim, dim, 1)])

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        y = x
        for module in self.block:
            y = module(y, state)
        return x + y


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class WindowAttention(nn.Module):
    """Causal multi-head attention limited to the last `window` positions, RoPE at absolute positions."""

    def __init__(self, cfg: CodecTransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.window = cfg.n_head, cfg.head_dim, cfg.window
        inner = cfg.n_head * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, state: StreamState | None) -> Tensor:
        """`x [B, T, dim]`, `rope` at its positions (`[T, ...]`, or `[B, T, ...]` for rows at their own
        positions); `state` carries (keys, values, lengths): the previous window's keys/values `[B, H, M, D]`,
        row b's in its last `lengths[b]` slots (rows of a batch merged from several streams hold fewer than M:
        the slots before are padding and masked out)."""
        bsz, seq, _ = x.shape
        q, k, v = self.wqkv(x).view(bsz, seq, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        lengths = [0] * bsz
        if state is not None and self in state:
            k_prev, v_prev, lengths = state[self]
            k, v = torch.cat([k_prev, k], dim=2), torch.cat([v_prev, v], dim=2)
        held = k.shape[2] - seq
        if state is not None:
            keep = min(self.window - 1, k.shape[2])
            state[self] = (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:],
                           [min(keep, length + seq) for length in lengths])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(seq, held, lengths, x.device))
        return self.wo(y.transpose(1, 2).reshape(bsz, seq, -1))

    def mask(self, seq: int, held: int, lengths: list[int], device: torch.device) -> Tensor:
        """Query t sees key slot j (the `held` earlier slots, then the T new ones) when it lies 0..window-1
        positions back (t + held - j, whatever the row's absolute position) and is not padding: `[T, held + T]`
        when every row holds `held` keys, else `[B, 1, T, held + T]`."""
        delta = torch.arange(seq, device=device)[:, None] + held - torch.arange(held + seq, device=device)[None, :]
        mask = (delta >= 0) & (delta < self.window)
        if all(length == held for length in lengths):
            return mask
        first = held - torch.tensor(lengths, device=device)  # each row's first real slot
        return (mask[None] & (torch.arange(held + seq, device=device)[None, None, :] >= first[:, None, None]))[:, None]


class CodecTransformerBlock(nn.Module):
    def __init__(self, cfg: CodecTransformerConfig) -> None:
        super().__init__()
        self.attention = WindowAttention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.intermediate_size)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_layer_scale = LayerScale(cfg.dim)
        self.ffn_layer_scale = LayerScale(cfg.dim)

    def forward(self, x: Tensor, rope: Tensor, state: StreamState | None) -> Tensor:
        x = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope, state))
        return x + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(x)))


class CodecTransformer(nn.Module):
    """Window-limited causal transformer over `[B, C, T]` (input/output projections are identities)."""

    def __init__(self, cfg: CodecTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(CodecTransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.reset_buffers()

    def reset_buffers(self, length: int | None = None) -> None:
        length = length or self.cfg.block_size
        self.register_buffer("rope", rope_table(length, self.cfg.head_dim, self.cfg.rope_base, self.norm.weight.device),
                             persistent=False)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        """`x [B, C, T]`; `state` carries each row's next position (a list: the rows of a batch merged from
        several streams may be at different positions)."""
        bsz, seq = x.shape[0], x.shape[-1]
        starts = [0] * bsz if state is None else state.get(self, [0] * bsz)
        end = max(starts) + seq
        if end > self.rope.shape[0]:  # upstream's table bounds the length; ours just grows
            self.reset_buffers(max(end, 2 * self.rope.shape[0]))
        if all(start == starts[0] for start in starts):
            rope = self.rope[starts[0]:starts[0] + seq]
        else:
            positions = torch.tensor(starts, device=x.device)[:, None] + torch.arange(seq, device=x.device)
            rope = self.rope[positions]
        h = x.transpose(1, 2)
        for layer in self.layers:
            h = layer(h, rope, state)
        if state is not None:
            state[self] = [start + seq for start in starts]
        return self.norm(h).transpose(1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        y = self.dwconv(x, state).transpose(1, 2)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int, transformer: CodecTransformerConfig | None) -> None:
        super().__init__()
        half = dim // 2
        modules: list[nn.Module] = [ResidualUnit(half, 1), ResidualUnit(half, 3), ResidualUnit(half, 9), Snake(half),
                                    CausalConv1d(half, dim, 2 * stride, stride=stride)]
        if transformer is not None:
            modules.append(CodecTransformer(transformer))
        self.block = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.block:
            x = module(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.encoder_dim
        modules: list[nn.Module] = [CausalConv1d(1, dim, 7)]
        for i, stride in enumerate(cfg.encoder_rates):
            dim *= 2
            last = i == len(cfg.encoder_rates) - 1
            modules.append(EncoderBlock(dim, stride, cfg.encoder_transformer if last else None))
        modules += [Snake(dim), CausalConv1d(dim, cfg.latent_dim, 3)]
        self.block = nn.ModuleList(modules)

    def forward(self, audio: Tensor) -> Tensor:
        x = audio
        for module in self.block:
            x = module(x)
        return x


class DecoderBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([Snake(c_in), CausalConvTranspose1d(c_in, c_out, 2 * stride, stride),
                                    ResidualUnit(c_out, 1), ResidualUnit(c_out, 3), ResidualUnit(c_out, 9)])

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        for module in self.block:
            x = module(x, state)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.decoder_dim
        modules: list[nn.Module] = [CausalConv1d(cfg.latent_dim, dim, 7)]
        for stride in cfg.decoder_rates:
            modules.append(DecoderBlock(dim, dim // 2, stride))
            dim //= 2
        modules += [Snake(dim), CausalConv1d(dim, 1, 7)]
        self.model = nn.ModuleList(modules)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        for module in self.model:
            x = module(x, state)
        return torch.tanh(x)


class VectorQuantizer(nn.Module):
    """Project to `codebook_dim`, pick the nearest codeword by cosine, project the raw codeword back."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(dim, codebook_dim, 1)
        self.out_proj = nn.Conv1d(codebook_dim, dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """`z [B, dim, T]` -> (quantized `[B, dim, T]`, codes `[B, T]`)."""
        latents = F.normalize(self.in_proj(z).transpose(1, 2), dim=-1)
        codewords = F.normalize(self.codebook.weight, dim=-1)
        codes = (latents @ codewords.t()).argmax(dim=-1)
        return self.decode(codes), codes

    def decode(self, codes: Tensor) -> Tensor:
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class QuantizerStages(nn.Module):
    def __init__(self, n: int, dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(VectorQuantizer(dim, codebook_size, codebook_dim) for _ in range(n))


class Quantizer(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.latent_dim
        self.semantic_quantizer = QuantizerStages(1, dim, cfg.semantic_codebook_size, cfg.codebook_dim)
        self.quantizer = QuantizerStages(cfg.residual_codebooks, dim, cfg.residual_codebook_size, cfg.codebook_dim)
        self.downsample = nn.ModuleList(nn.ModuleList([CausalConv1d(dim, dim, f, stride=f), ConvNeXtBlock(dim)])
                                        for f in cfg.downsample_factor)
        self.upsample = nn.ModuleList(nn.ModuleList([CausalConvTranspose1d(dim, dim, f, f), ConvNeXtBlock(dim)])
                                      for f in reversed(cfg.downsample_factor))
        self.pre_module = CodecTransformer(cfg.quantizer_transformer)
        self.post_module = CodecTransformer(cfg.quantizer_transformer)
        self.max_codes = [cfg.semantic_codebook_size - 1] + [cfg.residual_codebook_size - 1] * cfg.residual_codebooks

    def prepare(self, latent: Tensor) -> Tensor:
        """Encoder latent `[B, C, 4T]` -> the semantic quantizer's input `[B, C, T]`."""
        for stage in self.downsample:
            for module in stage:
                latent = module(latent)
        return self.pre_module(latent)

    def quantize(self, z: Tensor) -> Tensor:
        """`[B, C, T]` -> codes `[B, 10, T]`: row 0 semantic, rows 1.. residual stages."""
        z_q, semantic = self.semantic_quantizer.quantizers[0].encode(z)
        residual = z - z_q
        codes = [semantic]
        for stage in self.quantizer.quantizers:
            z_q, stage_codes = stage.encode(residual)
            residual = residual - z_q
            codes.append(stage_codes)
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """Codes `[B, 10, T]` -> decoder input `[B, C, 4T]`. Out-of-range codes are clamped in a copy."""
        limits = torch.tensor(self.max_codes, device=codes.device)[None, :, None]
        codes = torch.minimum(codes.clamp(min=0), limits)
        z = self.semantic_quantizer.quantizers[0].decode(codes[:, 0])
        for i, stage in enumerate(self.quantizer.quantizers):
            z = z + stage.decode(codes[:, i + 1])
        z = self.post_module(z, state)
        for stage in self.upsample:
            for module in stage:
                z = module(z, state)
        return z


class FishCodec(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = Quantizer(cfg)
        self.decoder = Decoder(cfg)

    def reset_buffers(self) -> None:
        for module in self.modules():
            if isinstance(module, CodecTransformer):
                module.reset_buffers()

    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """`audio [B, 1, L]` at 44.1 kHz -> codes `[B, 10, ceil(L / 2048)]` (zero-padded, every frame kept)."""
        frame = self.cfg.frame_length
        audio = F.pad(audio, (0, -audio.shape[-1] % frame))
        return self.quantizer.quantize(self.quantizer.prepare(self.encoder(audio)))

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes `[B, 10, T]` -> audio `[B, 1, T * 2048]` in (-1, 1), untrimmed."""
        return self.decoder(self.quantizer.decode(codes))


class DecodeStream:
    """Incremental decode of one utterance: `push(codes [B, 10, n])` returns the next `n * 2048` samples."""

    def __init__(self, codec: FishCodec) -> None:
        self.codec = codec
        self.state: StreamState = {}

    @torch.inference_mode()
    def push(self, codes: Tensor) -> Tensor:
        return self.codec.decoder(self.codec.quantizer.decode(codes, self.state), self.state)


def load_codec(path: str | Path, device: torch.device | str = "cpu") -> FishCodec:
    """Load `codec.pth` strictly into a codec whose sizes are read off the checkpoint; weights stay float32."""
    state = load_state_dict(path)
    cfg = CodecConfig.from_state_dict(state, str(path))  # reads head sizes off the RoPE buffers when present
    state = fold_weight_norm({k: v for k, v in state.items() if not k.endswith(_BUFFER_SUFFIXES)})
    with torch.device("meta"):
        codec = FishCodec(cfg)
    codec = codec.to_empty(device=device)
    codec.reset_buffers()
    check_keys(codec, state, str(path))
    return codec.eval()
