"""Fish Speech / OpenAudio S1-mini hyper-parameters.

`DualARConfig` mirrors the release's flat `config.json` (`model_type: dual_ar`). Like the S1 loader, every key
in the file must be a known field: an unknown key is an error (the S1 code passes the dict straight to a
dataclass constructor). Optional fields take the S1 defaults when absent.

The codec has no config file in the release (S1 takes a hydra config name from inside its own repository), so
`CodecConfig` is inferred from the `codec.pth` tensor shapes; where a shape does not say it (attention head
size when the RoPE buffers are absent, windows) the release values (`modded_dac_vq`) are used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cosyapp.backends.weights import read_json_file
from cosyapp.engine.types import ModelFileError

SAMPLE_RATE = 44100
CONFIG_FILE = "config.json"
LLM_FILE = "model.pth"
TOKENIZER_FILE = "tokenizer.tiktoken"
SPECIAL_TOKENS_FILE = "special_tokens.json"
CODEC_FILE = "codec.pth"
MODEL_FILES = (CONFIG_FILE, LLM_FILE, TOKENIZER_FILE, SPECIAL_TOKENS_FILE, CODEC_FILE)


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


_FAST_DEFAULTS = {
    "fast_dim": "dim", "fast_n_head": "n_head", "fast_n_local_heads": "n_local_heads", "fast_head_dim": "head_dim",
    "fast_intermediate_size": "intermediate_size", "fast_attention_qkv_bias": "attention_qkv_bias",
    "fast_attention_qk_norm": "attention_qk_norm", "fast_attention_o_bias": "attention_o_bias",
}


@dataclass
class DualARConfig:
    model_type: str = "dual_ar"
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int | None = None  # None -> round_up(8*dim/3, 256)
    n_local_heads: int = -1  # -1 -> n_head
    head_dim: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    attention_qkv_bias: bool = False
    attention_o_bias: bool = False
    attention_qk_norm: bool = False
    codebook_size: int = 160
    num_codebooks: int = 4
    scale_codebook_embeddings: bool = False
    # Training-only fields, accepted and unused at inference.
    use_gradient_checkpointing: bool = True
    initializer_range: float = 0.02
    is_reward_model: bool = False
    # Fast (per-frame, over codebooks) transformer; None -> the slow counterpart.
    n_fast_layer: int = 4
    fast_dim: int | None = None
    fast_n_head: int | None = None
    fast_n_local_heads: int | None = None
    fast_head_dim: int | None = None
    fast_intermediate_size: int | None = None
    fast_attention_qkv_bias: bool | None = None
    fast_attention_qk_norm: bool | None = None
    fast_attention_o_bias: bool | None = None

    def __post_init__(self) -> None:
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(int(2 * 4 * self.dim / 3), 256)
        for fast_name, slow_name in _FAST_DEFAULTS.items():
            if getattr(self, fast_name) is None:
                setattr(self, fast_name, getattr(self, slow_name))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = CONFIG_FILE) -> DualARConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ModelFileError(f"{source}: unknown config keys {unknown} (the S1 loader rejects them too)")
        if raw.get("model_type", "dual_ar") != "dual_ar":
            raise ModelFileError(f"{source}: model_type {raw['model_type']!r} is not supported (need 'dual_ar')")
        cfg = cls(**raw)
        if cfg.is_reward_model:
            raise ModelFileError(f"{source}: reward models are not supported")
        if cfg.fast_dim != cfg.dim:
            raise ModelFileError(f"{source}: fast_dim {cfg.fast_dim} != dim {cfg.dim} (a fast_project_in layer) "
                                 "is not supported")
        if cfg.n_head % cfg.n_local_heads or cfg.fast_n_head % cfg.fast_n_local_heads:
            raise ModelFileError(f"{source}: n_head must be a multiple of n_local_heads")
        return cfg

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> DualARConfig:
        path = Path(model_dir) / CONFIG_FILE
        raw = read_json_file(path)
        if not isinstance(raw, dict):
            raise ModelFileError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CodecTransformerConfig:
    n_layer: int
    dim: int
    n_head: int
    head_dim: int
    intermediate_size: int
    window: int  # query t attends to keys t-window+1 .. t
    block_size: int  # RoPE table length upstream; sequences must be shorter in the faithful path
    rope_base: float = 10000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class CodecConfig:
    """The S1 modded-DAC codec (causal). Defaults are the release values (`modded_dac_vq`)."""

    sample_rate: int = SAMPLE_RATE
    encoder_dim: int = 64
    encoder_rates: tuple[int, ...] = (2, 4, 8, 8)
    decoder_dim: int = 1536
    decoder_rates: tuple[int, ...] = (8, 8, 4, 2)
    encoder_transformer: CodecTransformerConfig = CodecTransformerConfig(4, 1024, 16, 64, 3072, 512, 16384)
    semantic_codebook_size: int = 4096
    residual_codebooks: int = 9
    residual_codebook_size: int = 1024
    codebook_dim: int = 8
    downsample_factor: tuple[int, ...] = (2, 2)
    quantizer_transformer: CodecTransformerConfig = CodecTransformerConfig(8, 1024, 16, 64, 3072, 128, 4096)

    @property
    def latent_dim(self) -> int:
        return self.encoder_dim * 2 ** len(self.encoder_rates)

    @property
    def hop_length(self) -> int:  # samples per encoder latent frame
        return math.prod(self.encoder_rates)

    @property
    def frame_length(self) -> int:  # samples per code frame
        return self.hop_length * math.prod(self.downsample_factor)

    @property
    def num_codebooks(self) -> int:
        return 1 + self.residual_codebooks

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str = CODEC_FILE) -> CodecConfig:
        """Infer sizes from checkpoint shapes (weight-norm already folded or not: both spellings work)."""

        def shape(key: str) -> tuple[int, ...]:
            for candidate in (key + ".weight", key + ".parametrizations.weight.original1", key + ".weight_v"):
                if candidate in state:
                    return tuple(state[candidate].shape)
            raise ModelFileError(f"{source}: missing tensor {key}.weight (not an S1 codec checkpoint?)")

        def transformer(prefix: str, window: int, default: CodecTransformerConfig) -> CodecTransformerConfig:
            depth = len(prefix.split(".")) + 1  # index of the layer number in a key
            n_layer = len({k.split(".")[depth] for k in state if k.startswith(prefix + ".layers.")})
            if n_layer == 0:
                raise ModelFileError(f"{source}: no transformer layers under {prefix}")
            dim = shape(f"{prefix}.layers.0.attention.wo")[0]
            inner = shape(f"{prefix}.layers.0.attention.wo")[1]
            rope = state.get(prefix + ".freqs_cis")
            head_dim = int(rope.shape[1]) * 2 if rope is not None else default.head_dim
            block_size = int(rope.shape[0]) if rope is not None else default.block_size
            return CodecTransformerConfig(n_layer, dim, inner // head_dim, head_dim,
                                          shape(f"{prefix}.layers.0.feed_forward.w1")[0], window, block_size)

        encoder_dim = shape("encoder.block.0.conv")[0]
        n_enc = len({k.split(".")[2] for k in state if k.startswith("encoder.block.")}) - 3
        encoder_rates = tuple(shape(f"encoder.block.{i + 1}.block.4.conv")[2] // 2 for i in range(n_enc))
        n_dec = len({k.split(".")[2] for k in state if k.startswith("decoder.model.")}) - 3
        decoder_rates = tuple(shape(f"decoder.model.{i + 1}.block.1.conv")[2] // 2 for i in range(n_dec))
        n_down = len({k.split(".")[2] for k in state if k.startswith("quantizer.downsample.")})
        downsample = tuple(shape(f"quantizer.downsample.{i}.0.conv")[2] for i in range(n_down))
        enc_tf = [i for i in range(n_enc) if any(k.startswith(f"encoder.block.{i + 1}.block.5.") for k in state)]
        if enc_tf != [n_enc - 1]:
            raise ModelFileError(f"{source}: expected one encoder transformer, in the last encoder block")
        n_res = len({k.split(".")[3] for k in state if k.startswith("quantizer.quantizer.quantizers.")})
        return cls(
            encoder_dim=encoder_dim,
            encoder_rates=encoder_rates,
            decoder_dim=shape("decoder.model.0.conv")[0],
            decoder_rates=decoder_rates,
            encoder_transformer=transformer(f"encoder.block.{n_enc}.block.5", 512, cls.encoder_transformer),
            semantic_codebook_size=shape("quantizer.semantic_quantizer.quantizers.0.codebook")[0],
            residual_codebooks=n_res,
            residual_codebook_size=shape("quantizer.quantizer.quantizers.0.codebook")[0],
            codebook_dim=shape("quantizer.semantic_quantizer.quantizers.0.codebook")[1],
            downsample_factor=downsample,
            quantizer_transformer=transformer("quantizer.pre_module", 128, cls.quantizer_transformer),
        )


def tiny_codec_config() -> CodecConfig:
    """The golden tiny codec sizes (README section 2), for `make_tiny(size="tiny")`."""
    return CodecConfig(
        encoder_dim=4,
        decoder_dim=64,
        encoder_transformer=CodecTransformerConfig(1, 64, 1, 64, 192, 512, 832),
        quantizer_transformer=CodecTransformerConfig(1, 64, 2, 32, 192, 128, 256),
    )
