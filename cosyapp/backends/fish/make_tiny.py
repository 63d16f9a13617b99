"""Random-weight Fish S1 model directories in the release layout (tests: "tiny", benchmarks: "full").

Files: `config.json` (the release key set), `model.pth` (flat bf16 state dict), `tokenizer.tiktoken`,
`special_tokens.json` (15 control tokens + 4096 semantic tokens, numbered after the BPE ranks) and `codec.pth`
(fp32, weight norm in both spellings like the release: `parametrizations.weight.original0/1` on the causal
convs, `weight_g/weight_v` on the VQ projections, plus the persistent RoPE/mask buffers).

Weights are seeded normal draws scaled so that activations stay O(1) (not the training init, whose tiny
layer scales would hide most parameters): Linear/conv ~N(0, 1/fan_in), embeddings ~N(0, 0.3^2), norms ~1,
Snake alphas exp(N(0, 0.3^2)), layer-scale gammas ~0.3.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.fish.codec import (CausalConv1d, CausalConvTranspose1d, CodecTransformer, ConvNeXtBlock,
                                         FishCodec, LayerScale, ResidualUnit, Snake, VectorQuantizer)
from cosyapp.backends.fish.config import (CODEC_FILE, CONFIG_FILE, LLM_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE,
                                          CodecConfig, DualARConfig, tiny_codec_config)
from cosyapp.backends.fish.dual_ar import DualARTransformer, RMSNorm, rope_table
from cosyapp.backends.fish.tokenizer import semantic_token

CONTROL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>",
                  "<|phoneme_start|>", "<|phoneme_end|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|text|>",
                  "<|voice|>", "<|interleave|>", "<|audio_start|>", "<|audio_end|>", "<|audio|>")
N_SEMANTIC = 4096
RELEASE_BPE_RANKS = 151643

# The release config.json (openaudio-s1-mini); "tiny" shrinks the sizes like the golden tiny checkpoint.
FULL_CONFIG = dict(
    attention_o_bias=False, attention_qk_norm=True, attention_qkv_bias=False, codebook_size=4096, dim=1024,
    dropout=0.0, fast_attention_o_bias=False, fast_attention_qk_norm=False, fast_attention_qkv_bias=False,
    fast_dim=1024, fast_head_dim=64, fast_intermediate_size=3072, fast_n_head=16, fast_n_local_heads=8,
    head_dim=128, initializer_range=0.03125, intermediate_size=3072, max_seq_len=8192, model_type="dual_ar",
    n_fast_layer=4, n_head=16, n_layer=28, n_local_heads=8, norm_eps=1e-06, num_codebooks=10, rope_base=1000000.0,
    scale_codebook_embeddings=True, tie_word_embeddings=False, use_gradient_checkpointing=True, vocab_size=155776)
TINY_SIZES = dict(dim=64, n_layer=2, n_head=4, n_local_heads=2, head_dim=32, intermediate_size=192, n_fast_layer=1,
                  fast_dim=64, fast_n_head=4, fast_n_local_heads=2, fast_head_dim=16, fast_intermediate_size=192,
                  max_seq_len=4096)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _bpe_ranks(n_ranks: int) -> list[bytes]:
    """The 256 single bytes, then filler 3-byte tokens. Without 2-byte tokens no merge can reach a filler,
    so text tokenises byte by byte; the fillers only give the vocabulary its release size."""
    tokens = [bytes([i]) for i in range(256)]
    tokens += [bytes([i // 65536, (i // 256) % 256, i % 256]) for i in range(n_ranks - 256)]
    return tokens


def write_tokenizer(out_dir: Path, n_ranks: int) -> int:
    """Write `tokenizer.tiktoken` and `special_tokens.json`; returns the number of ids (ranks + specials)."""
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(_bpe_ranks(n_ranks))]
    (out_dir / TOKENIZER_FILE).write_text("\n".join(lines) + "\n", encoding="ascii")
    specials = list(CONTROL_TOKENS) + [semantic_token(i) for i in range(N_SEMANTIC)]
    special_ids = {token: n_ranks + i for i, token in enumerate(specials)}
    (out_dir / SPECIAL_TOKENS_FILE).write_text(json.dumps(special_ids, indent=2, ensure_ascii=False), encoding="utf-8")
    return n_ranks + len(specials)


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded O(1)-activation init of every parameter (see the module docstring)."""

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            fan_in = sub.weight[0].numel() if not isinstance(sub, nn.ConvTranspose1d) else \
                sub.weight.shape[0] * sub.weight.shape[2] // sub.stride[0]
            sub.weight.data = normal(sub.weight.shape, 1 / math.sqrt(fan_in))
            if sub.bias is not None:
                sub.bias.data = normal(sub.bias.shape, 0.05)
        elif isinstance(sub, nn.Embedding):
            sub.weight.data = normal(sub.weight.shape, 0.3)
        elif isinstance(sub, (RMSNorm, nn.LayerNorm)):
            sub.weight.data = 1 + normal(sub.weight.shape, 0.1)
            if getattr(sub, "bias", None) is not None:
                sub.bias.data = normal(sub.bias.shape, 0.05)
        elif isinstance(sub, Snake):
            sub.alpha.data = normal(sub.alpha.shape, 0.3).exp()
        elif isinstance(sub, (LayerScale, ConvNeXtBlock)):
            sub.gamma.data = 0.3 * (1 + normal(sub.gamma.shape, 0.2))


def make_llm(config: DualARConfig, semantic_begin_id: int, semantic_end_id: int, im_end_id: int,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """A random DualAR state dict in the release spelling (bf16)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):  # skip torch's default init: `_init_` sets every parameter
        model = DualARTransformer(config, semantic_begin_id, semantic_end_id)
    model = model.to_empty(device="cpu")
    model.reset_buffers()
    _init_(model, generator)
    with torch.no_grad():
        model.output.weight.mul_(2.4)  # peaky enough logits that sampling is not uniform noise
        model.output.weight[im_end_id].mul_(1.8)  # so that generation sometimes stops
        model.output.weight[semantic_end_id + 1:].mul_(0.004)  # vocabulary padding: never sampled in practice
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def _split_weight_norm(key: str, weight: torch.Tensor, style: str) -> dict[str, torch.Tensor]:
    g = weight.norm(dim=tuple(range(1, weight.dim())), keepdim=True)
    base = key[: -len(".weight")]
    if style == "parametrizations":
        return {base + ".parametrizations.weight.original0": g, base + ".parametrizations.weight.original1": weight}
    return {base + ".weight_g": g, base + ".weight_v": weight}


def _calibrate_decoder(codec: FishCodec, generator: torch.Generator, target_std: float = 0.45) -> None:
    """Keep the random decoder well conditioned: damp the residual branches (each unit would otherwise double
    the signal variance) and scale the final conv so the pre-tanh output has `target_std`, like the golden
    tiny codec. Without this the output saturates and float noise is amplified a thousandfold."""
    with torch.no_grad():
        for module in codec.decoder.modules():
            if isinstance(module, ResidualUnit):
                module.block[3].conv.weight.mul_(0.5)
        stages = [*codec.quantizer.semantic_quantizer.quantizers, *codec.quantizer.quantizer.quantizers]
        codes = torch.stack([torch.randint(0, q.codebook.num_embeddings, (64,), generator=generator) for q in stages])
        x = codec.quantizer.decode(codes[None])
        for module in codec.decoder.model[:-1]:
            x = module(x)
        final = codec.decoder.model[-1].conv
        scale = target_std / final(F.pad(x, (final.kernel_size[0] - 1, 0))).std()
        final.weight.mul_(scale)
        final.bias.mul_(scale)


def make_codec(cfg: CodecConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """A random codec state dict in the release spelling (fp32, weight norm unfolded, persistent buffers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        codec = FishCodec(cfg)
    codec = codec.to_empty(device="cpu")
    codec.reset_buffers()
    _init_(codec, generator)
    _calibrate_decoder(codec, generator)
    plain = {"quantizer.downsample", "quantizer.upsample"}  # these convs carry no weight norm
    state: dict[str, torch.Tensor] = {}
    for name, module in codec.named_modules():
        params = {f"{name}.{k}": v.detach().clone() for k, v in module.named_parameters(recurse=False)}
        is_conv = isinstance(module, (nn.Conv1d, nn.ConvTranspose1d))
        parent = name.rsplit(".", 1)[0]
        wrapped = any(isinstance(codec.get_submodule(parent), t) for t in (CausalConv1d, CausalConvTranspose1d)) \
            if is_conv else False
        if is_conv and wrapped and not any(name.startswith(p) for p in plain):
            state.update(_split_weight_norm(f"{name}.weight", params.pop(f"{name}.weight"), "parametrizations"))
        elif is_conv and isinstance(codec.get_submodule(parent), VectorQuantizer):
            state.update(_split_weight_norm(f"{name}.weight", params.pop(f"{name}.weight"), "weight_g"))
        state.update(params)
        if isinstance(module, CodecTransformer):
            block = module.cfg.block_size
            state[f"{name}.freqs_cis"] = rope_table(block, module.cfg.head_dim, module.cfg.rope_base).to(torch.bfloat16)
            state[f"{name}.causal_mask"] = torch.ones(block, block, dtype=torch.bool).tril()
    return state


def make_tiny(out_dir: Path, size: str = "tiny") -> None:
    """Write a random-weight S1 model directory; `size` "tiny" (tests, ~10 MB) or "full" (release sizes)."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_ranks = 256 if size == "tiny" else RELEASE_BPE_RANKS
    n_ids = write_tokenizer(out_dir, n_ranks)
    raw = dict(FULL_CONFIG, vocab_size=_round_up(n_ids, 64))
    if size == "tiny":
        raw.update(TINY_SIZES)
    (out_dir / CONFIG_FILE).write_text(json.dumps(raw, indent=4, sort_keys=True), encoding="utf-8")
    semantic_begin = n_ranks + len(CONTROL_TOKENS)
    im_end = n_ranks + CONTROL_TOKENS.index("<|im_end|>")
    llm = make_llm(DualARConfig.from_dict(raw), semantic_begin, semantic_begin + N_SEMANTIC - 1, im_end)
    torch.save(llm, out_dir / LLM_FILE)
    torch.save(make_codec(tiny_codec_config() if size == "tiny" else CodecConfig()), out_dir / CODEC_FILE)
