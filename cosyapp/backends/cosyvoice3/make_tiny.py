"""Write a random-weight CosyVoice3 model directory in the official Fun-CosyVoice3-0.5B-2512 layout.

`size="tiny"` gives a model of a few MB for tests and demos; `size="full"` the release's shapes (about 2 GB)
for benchmarks. The audio is noise-like, but every shape, file name, key name and code path is the real one.
The tokenizer files and the two ONNX stand-ins are CosyVoice2's (the v3 speech tokenizer has the v2 one's
inputs and outputs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosyapp.backends.cosyvoice2.config import read_hyperpyyaml
from cosyapp.backends.cosyvoice2.make_tiny import (_split_weight_norm, _write_campplus_standin,
                                                   _write_qwen_config, _write_speech_tokenizer_standin,
                                                   _write_tokenizer)
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

_YAML_TEMPLATE = """\
# Random-weight CosyVoice3 model written by `cosyapp models make-tiny` (size: {size}). NOT a trained model.
# Same structure and non-size hyperparameters as the Fun-CosyVoice3-0.5B-2512 release (inference part).
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

sample_rate: 24000
llm_input_size: {qwen_hidden}
llm_output_size: {qwen_hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.CosyVoice3LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithDiT
    input_size: 80
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    pre_lookahead_layer: !new:cosyvoice.transformer.upsample_encoder.PreLookaheadLayer
        in_channels: 80
        channels: {pre_lookahead_channels}
        pre_lookahead_len: 3
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
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

hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    conv_pre_look_right: 4
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0_channels}

feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: null
    center: False
"""

# hift.pt stores these convolutions weight-normalised (torch parametrization keys), the rest plainly.
_HIFT_WEIGHT_NORMED = re.compile(
    r"^(conv_pre|conv_post|ups\.\d+|f0_predictor\.condnet\.\d+|(source_)?resblocks\.\d+\.convs[12]\.\d+)\.weight$"
)


SPEECH_LOGIT_SCALE = 8.0


def _llm_state(config: CosyVoice3Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice3.llm import CosyVoice3LM

    state = {k: v.detach().clone() for k, v in CosyVoice3LM(config.llm).state_dict().items()}
    # The release ties Qwen's unused lm_head to the text embedding; torch.save stores the storage once.
    state["llm.model.lm_head.weight"] = state["llm.model.model.embed_tokens.weight"]
    # Any of the 200 ids past the speech tokens stops decoding, even before min_len (upstream's rule); with
    # random heads of one scale a sentence would stop after a few tokens about a third of the time and make no
    # audio. Sharper speech logits keep the stop ids out of the sampled top-k, so random models speak on.
    state["llm_decoder.weight"][:config.llm.speech_token_size] *= SPEECH_LOGIT_SCALE
    return state


def _flow_state(config: CosyVoice3Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice3.flow import CosyVoice3Flow

    return {k: v.detach().clone() for k, v in CosyVoice3Flow(config.flow).state_dict().items()}


def _hift_state(config: CosyVoice3Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice3.hift import CausalHiFTGenerator

    state: dict[str, torch.Tensor] = {}
    for key, value in CausalHiFTGenerator(config).state_dict().items():
        if _HIFT_WEIGHT_NORMED.match(key):
            base = key[: -len(".weight")]
            g, v = _split_weight_norm(value.detach().float())
            state[base + ".parametrizations.weight.original0"] = g
            state[base + ".parametrizations.weight.original1"] = v
        else:
            state[key] = value.detach().float().clone()
    return state


def make_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random CosyVoice3 model directory in the official layout; returns its path."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    dims = SIZES[size]
    out = Path(out_dir)
    blank_en = out / "CosyVoice-BlankEN"
    blank_en.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    (out / CONFIG_FILE).write_text(_YAML_TEMPLATE.format(size=size, **dims.__dict__), encoding="utf-8")
    _write_tokenizer(blank_en, dims.qwen_vocab)
    eos_id = json.loads((blank_en / "generation_config.json").read_text())["eos_token_id"]
    _write_qwen_config(blank_en, dims, eos_id)
    config = CosyVoice3Config.from_dicts(
        read_hyperpyyaml(out / CONFIG_FILE), json.loads((blank_en / "config.json").read_text())
    )
    torch.save(_llm_state(config), out / "llm.pt")
    torch.save(_flow_state(config), out / "flow.pt")
    torch.save(_hift_state(config), out / "hift.pt")
    _write_campplus_standin(out / "campplus.onnx", rng)
    _write_speech_tokenizer_standin(out / "speech_tokenizer_v3.onnx", rng)
    return out
