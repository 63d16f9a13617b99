"""Write a random-weight CosyVoice3 model directory in the official Fun-CosyVoice3-0.5B-2512 layout.

`size="tiny"` gives a model of a few MB for tests and demos; `size="full"` the release's shapes (about 2 GB)
for benchmarks. The audio is noise-like, but every shape, file name, key name and code path is the real one.
The tokenizer files and the two ONNX stand-ins are CosyVoice2's (the v3 speech tokenizer has the v2 one's
inputs and outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cosyapp.backends.cosyvoice2.make_tiny import (
    YAML_CFM,
    hift_state,
    module_state,
    tie_lm_head,
    write_model_dir,
    yaml_flow_top,
    yaml_hift,
    yaml_mel,
    yaml_top,
)
from cosyapp.backends.cosyvoice3.config import CONFIG_FILE, CosyVoice3Config


@dataclass(frozen=True)
class ModelSize:
    qwen_hidden: int
    qwen_layers: int
    qwen_heads: int
    qwen_kv_heads: int
    qwen_intermediate: int
    qwen_vocab: int
    pre_lookahead_channels: int
    dit_dim: int
    dit_depth: int
    dit_heads: int
    dit_dim_head: int
    hift_channels: int
    f0_channels: int


SIZES = {
    # The tiny Qwen vocabulary holds 2000 BPE tokens, 3 Qwen specials and the 280 CosyVoice3 specials.
    "tiny": ModelSize(64, 2, 4, 2, 128, 2304, 64, 64, 2, 4, 16, 32, 32),
    "full": ModelSize(896, 24, 14, 2, 4864, 151936, 1024, 1024, 22, 16, 64, 512, 512),
}

_YAML_TEMPLATE = (
    """\
# Random-weight CosyVoice3 model written by `cosyapp models make-tiny` (size: {size}). NOT a trained model.
# Same structure and non-size hyperparameters as the Fun-CosyVoice3-0.5B-2512 release (inference part).
"""
    + yaml_top("CosyVoice3LM")
    + yaml_flow_top("CausalMaskedDiffWithDiT", input_size=80)
    + """\
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {pre_lookahead_channels}
        pre_lookahead_len: 3
"""
    + YAML_CFM
    + """\
        estimator: !new:cosyvoice.flow.DiT.dit.DiT
            dim: {dit_dim}
            depth: {dit_depth}
            heads: {dit_heads}
            dim_head: {dit_dim_head}
            ff_mult: 2
            mel_dim: 80
            mu_dim: 80
            spk_dim: 80
            out_channels: 80
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

"""
    + yaml_hift("CausalHiFTGenerator", "CausalConvRNNF0Predictor", extra="    conv_pre_look_right: 4\n")
    + yaml_mel(fmax="null")
)


SPEECH_LOGIT_SCALE = 8.0


def _llm_state(config: CosyVoice3Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice3.llm import CosyVoice3LM

    state = tie_lm_head(module_state(CosyVoice3LM(config.llm)))
    # Any of the 200 ids past the speech tokens stops decoding, even before min_len (upstream's rule); with
    # random heads of one scale a sentence would stop after a few tokens about a third of the time and make no
    # audio. Sharper speech logits keep the stop ids out of the sampled top-k, so random models speak on.
    state["llm_decoder.weight"][:config.llm.speech_token_size] *= SPEECH_LOGIT_SCALE
    return state


def _flow_state(config: CosyVoice3Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice3.flow import CosyVoice3Flow

    return module_state(CosyVoice3Flow(config.flow))


def _hift_state(config: CosyVoice3Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice3.hift import CausalHiFTGenerator

    # The causal F0 predictor is built in float64; the release's hift.pt holds float32 only.
    return hift_state(CausalHiFTGenerator(config), dtype=torch.float32)


def make_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random CosyVoice3 model directory in the official layout; returns its path."""
    return write_model_dir(
        out_dir, size, seed,
        sizes=SIZES,
        yaml_template=_YAML_TEMPLATE,
        config_file=CONFIG_FILE,
        read_config=CosyVoice3Config.from_dicts,
        weights=[("llm.pt", _llm_state), ("flow.pt", _flow_state), ("hift.pt", _hift_state)],
        speech_tokenizer_file="speech_tokenizer_v3.onnx",
    )
