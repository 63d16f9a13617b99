"""Write a random-weight CosyVoice2 model directory in the official release layout.

`size="tiny"` gives a model of a few MB for tests and demos; `size="full"` gives the real CosyVoice2-0.5B
shapes (about 2.6 GB on disk) for benchmarks. The audio of a random model is noise-like, but every tensor
shape, file name, key name and code path is the real one. The two ONNX files are small stand-ins with
the same inputs and outputs as CAM++ and the S3 speech tokenizer v2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config, read_hyperpyyaml

SPEECH_TOKEN_SIZE = 6561
WHISPER_MELS = 128


@dataclass(frozen=True)
class ModelSize:
    qwen_hidden: int
    qwen_layers: int
    qwen_heads: int
    qwen_kv_heads: int
    qwen_intermediate: int
    qwen_vocab: int
    encoder_heads: int
    encoder_linear_units: int
    encoder_blocks: int
    decoder_channels: int
    decoder_head_dim: int
    decoder_heads: int
    decoder_blocks: int
    decoder_mid_blocks: int
    hift_channels: int
    f0_channels: int


SIZES = {
    "tiny": ModelSize(64, 2, 4, 2, 128, 2048, 8, 64, 2, 64, 16, 4, 1, 1, 32, 32),
    "full": ModelSize(896, 24, 14, 2, 4864, 151936, 8, 2048, 6, 256, 64, 8, 4, 12, 512, 512),
}

# CosyVoice2's extra special tokens, appended after the base vocabulary in this order.
COSYVOICE2_SPECIAL_TOKENS = [
    "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]", "[clucking]",
    "[accent]", "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
]


# Sections of the yaml that CosyVoice3's template shares. `{name}` fields are filled from a ModelSize later by
# str.format; what differs between the versions (class names, `fmax`, extra keys) is a parameter.
def yaml_top(lm_class: str) -> str:
    """Seeds, top-level sizes and the `llm` section."""
    return f"""\
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

sample_rate: 24000
llm_input_size: {{qwen_hidden}}
llm_output_size: {{qwen_hidden}}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2

chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.{lm_class}
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

"""


def yaml_flow_top(flow_class: str, input_size: int) -> str:
    """The `flow` section's own keys, before its token encoder."""
    return f"""\
flow: !new:cosyvoice.flow.flow.{flow_class}
    input_size: {input_size}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
"""


# The flow decoder's CFM, up to its estimator.
YAML_CFM = """\
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
"""


def yaml_hift(generator_class: str, f0_class: str, extra: str = "") -> str:
    """The `hift` section; `extra` holds lines of generator keys only one version has."""
    return f"""\
hift: !new:cosyvoice.hifigan.generator.{generator_class}
    in_channels: 80
    base_channels: {{hift_channels}}
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
{extra}    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.{f0_class}
        num_class: 1
        in_channels: 80
        cond_channels: {{f0_channels}}

"""


def yaml_mel(fmax: str) -> str:
    """The `feat_extractor` section; `fmax` is written as given (a number or `null`)."""
    return f"""\
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: {fmax}
    center: False
"""


_YAML_TEMPLATE = (
    """\
# Random-weight CosyVoice2 model written by `cosyapp models make-tiny` (size: {size}). NOT a trained model.
# Same structure and non-size hyperparameters as the CosyVoice2-0.5B release.
"""
    + yaml_top("Qwen2LM")
    + yaml_flow_top("CausalMaskedDiffWithXvec", input_size=512)
    + """\
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {encoder_heads}
        linear_units: {encoder_linear_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
"""
    + YAML_CFM
    + """\
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{decoder_channels}]
            dropout: 0.0
            attention_head_dim: {decoder_head_dim}
            n_blocks: {decoder_blocks}
            num_mid_blocks: {decoder_mid_blocks}
            num_heads: {decoder_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

"""
    + yaml_hift("HiFTGenerator", "ConvRNNF0Predictor")
    + """\
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
"""
    + yaml_mel(fmax="8000")
)

# A small bilingual corpus for the random model's BPE: enough merges that English words and common
# Chinese characters become multi-byte tokens, as in the real tokenizer.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my name is Sam and I read this short sentence.",
    "Welcome! What would you like to order today?",
    "Streaming speech synthesis turns text into audio while it is still being generated.",
    "Please remember to bring your umbrella because it might rain later this evening.",
    "The little robot walked slowly across the kitchen floor, and two cats watched it.",
    "Music and language share many patterns of rhythm and melody.",
    "Thank you very much for listening to this demonstration of our speech server.",
    "Numbers like twenty four, one hundred and seven, and three thousand are spelled out.",
    "欢迎光临！请问您需要什么？",
    "今天天气真好，我们一起去公园散步吧。",
    "您好，有什么可以帮您？感谢您的来电，我们会尽快处理。",
    "你是一位专业的新闻主播，声音清晰，语调平稳，充满权威感。",
    "流式语音合成需要把语音标记切分成小块，每一块都会被转换成梅尔频谱。",
    "声码器再把梅尔频谱变成二十四千赫兹的波形。",
    "图书馆上午十点开门，晚上六点关门。",
    "请用非常开心的语气说这句话。",
]


def _write_tokenizer(blank_en: Path, vocab_size: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    qwen2_pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen2_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    base_vocab = min(2000, vocab_size - 3 - len(COSYVOICE2_SPECIAL_TOKENS))
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.model.save(str(blank_en))
    n_base = tokenizer.get_vocab_size()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = {
        str(n_base + i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
        for i, tok in enumerate(specials)
    }
    (blank_en / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": specials[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }, indent=2))
    (blank_en / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": n_base, "eos_token_id": n_base, "max_new_tokens": 2048}, indent=2))


def _write_qwen_config(blank_en: Path, size: ModelSize, eos_id: int) -> None:
    (blank_en / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "hidden_act": "silu",
        "hidden_size": size.qwen_hidden,
        "initializer_range": 0.02,
        "intermediate_size": size.qwen_intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": size.qwen_layers,
        "model_type": "qwen2",
        "num_attention_heads": size.qwen_heads,
        "num_hidden_layers": size.qwen_layers,
        "num_key_value_heads": size.qwen_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": size.qwen_vocab,
    }, indent=2))


# IR version of the written ONNX files: the one opset 18 came with, not the newest the installed onnx package
# writes, so an older onnxruntime (the one on a GPU machine, say) loads them too; the official files are older.
ONNX_IR_VERSION = 8


def _model(helper: Any, graph: Any) -> Any:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=ONNX_IR_VERSION)


def _write_campplus_standin(path: Path, rng: np.random.Generator) -> None:
    """fbank [B, T, 80] -> embedding [B, 192]: Linear, tanh, mean ++ unbiased std over time, Linear."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = (rng.standard_normal((80, 64)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((128, 192)) * 0.1).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(64, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.zeros(192, np.float32), "b2"),
        numpy_helper.from_array(np.array([1], np.int64), "time_axis"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("MatMul", ["fbank", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h"]),
        helper.make_node("ReduceMean", ["h", "time_axis"], ["mean"], keepdims=1),
        helper.make_node("Sub", ["h", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "time_axis"], ["sqsum"], keepdims=0),
        helper.make_node("Shape", ["h"], ["h_shape"]),
        helper.make_node("Gather", ["h_shape", "time_axis"], ["n_frames_i"], axis=0),
        helper.make_node("Cast", ["n_frames_i"], ["n_frames"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["n_frames", "one"], ["dof"]),
        helper.make_node("Div", ["sqsum", "dof"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Squeeze", ["mean", "time_axis"], ["mean2"]),
        helper.make_node("Concat", ["mean2", "std"], ["stats"], axis=1),
        helper.make_node("MatMul", ["stats", "w2"], ["e0"]),
        helper.make_node("Add", ["e0", "b2"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "campplus_standin",
        [helper.make_tensor_value_info("fbank", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", 192])],
        inits,
    )
    onnx.save(_model(helper, graph), str(path))


def _write_speech_tokenizer_standin(path: Path, rng: np.random.Generator) -> None:
    """feats [B, 128, T], feats_length int32 [B] -> indices int64 [B, feats_length[0] // 4] in [0, 6561).

    Conv (stride 4) -> tanh -> 1x1 conv to 8 digits -> round(tanh + 1) in {0, 1, 2} -> sum d_i * 3^i,
    the same finite scalar quantisation shape as the real tokenizer's output layer.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array((rng.standard_normal((32, WHISPER_MELS, 4)) * 0.05).astype(np.float32), "c1_w"),
        numpy_helper.from_array(np.zeros(32, np.float32), "c1_b"),
        numpy_helper.from_array((rng.standard_normal((8, 32, 1)) * 0.8).astype(np.float32), "c2_w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "c2_b"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array((3.0 ** np.arange(8)).astype(np.float32).reshape(1, 8, 1), "powers"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array(4, np.int32), "four"),
    ]
    nodes = [
        helper.make_node("Conv", ["feats", "c1_w", "c1_b"], ["h0"], kernel_shape=[4], strides=[4]),
        helper.make_node("Tanh", ["h0"], ["h1"]),
        helper.make_node("Conv", ["h1", "c2_w", "c2_b"], ["z"], kernel_shape=[1]),
        helper.make_node("Tanh", ["z"], ["tz"]),
        helper.make_node("Add", ["tz", "one"], ["tz1"]),
        helper.make_node("Round", ["tz1"], ["digits"]),
        helper.make_node("Mul", ["digits", "powers"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted", "axis1"], ["codes_f"], keepdims=0),
        helper.make_node("Cast", ["codes_f"], ["codes"], to=TensorProto.INT64),
        helper.make_node("Gather", ["feats_length", "zero"], ["len0"], axis=0),
        helper.make_node("Div", ["len0", "four"], ["n_tok_i32"]),
        helper.make_node("Cast", ["n_tok_i32"], ["n_tok"], to=TensorProto.INT64),
        helper.make_node("Slice", ["codes", "zero", "n_tok", "axis1"], ["indices"]),
    ]
    graph = helper.make_graph(
        nodes, "speech_tokenizer_v2_standin",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", WHISPER_MELS, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["B", "N"])],
        inits,
    )
    onnx.save(_model(helper, graph), str(path))


# hift.pt stores these convolutions weight-normalised (torch parametrization keys), the rest plainly.
_HIFT_WEIGHT_NORMED = re.compile(
    r"^(conv_pre|conv_post|ups\.\d+|f0_predictor\.condnet\.\d+|(source_)?resblocks\.\d+\.convs[12]\.\d+)\.weight$"
)
# A random speech head gives EOS a 1/6564 chance per step, so every utterance would run to the 20x-text cap.
# Raising the EOS logit to about 5% per step ends random utterances shortly after the minimum length,
# like a trained model, which keeps tests and demos short.
_EOS_LOGIT_BIAS = 5.85


def _split_weight_norm(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight -> (g, v) with g = ||v|| over every dim but 0, so that g * v / ||v|| == weight."""
    g = weight.norm(dim=tuple(range(1, weight.dim())), keepdim=True)
    return g, weight.clone()


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `module`'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def tie_lm_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release ties Qwen's unused lm_head to the text embedding; torch.save stores the storage once."""
    state["llm.model.lm_head.weight"] = state["llm.model.model.embed_tokens.weight"]
    return state


def hift_state(generator: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The vocoder's state in the release's layout, cast to `dtype` where given."""
    state: dict[str, torch.Tensor] = {}
    for key, value in generator.state_dict().items():
        value = value.detach() if dtype is None else value.detach().to(dtype)
        if _HIFT_WEIGHT_NORMED.match(key):
            base = key[: -len(".weight")]
            g, v = _split_weight_norm(value)
            state[base + ".parametrizations.weight.original0"] = g
            state[base + ".parametrizations.weight.original1"] = v
        else:
            state[key] = value.clone()
    return state


def _llm_state(config: CosyVoice2Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM

    state = module_state(CosyVoice2LM(config.llm))
    with torch.no_grad():
        state["llm_decoder.bias"][config.llm.eos_token] += _EOS_LOGIT_BIAS
    return tie_lm_head(state)


def _flow_state(config: CosyVoice2Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow

    return module_state(CosyVoice2Flow(config.flow))


def _hift_state(config: CosyVoice2Config) -> dict[str, torch.Tensor]:
    from cosyapp.backends.cosyvoice2.hift import HiFTGenerator

    return hift_state(HiFTGenerator(config.hift))


ConfigT = TypeVar("ConfigT")


def write_model_dir(
    out_dir: str | Path,
    size: str,
    seed: int,
    *,
    sizes: Mapping[str, Any],
    yaml_template: str,
    config_file: str,
    read_config: Callable[[dict[str, Any], dict[str, Any]], ConfigT],
    weights: Sequence[tuple[str, Callable[[ConfigT], dict[str, torch.Tensor]]]],
    speech_tokenizer_file: str,
) -> Path:
    """Write a random model directory of either version: yaml, tokenizer, Qwen config, `weights` in order
    (the torch seed makes them reproducible only in a fixed order), then the two ONNX stand-ins."""
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(sizes)}")
    dims = sizes[size]
    out = Path(out_dir)
    blank_en = out / "CosyVoice-BlankEN"
    blank_en.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    (out / config_file).write_text(yaml_template.format(size=size, **dims.__dict__), encoding="utf-8")
    _write_tokenizer(blank_en, dims.qwen_vocab)
    eos_id = json.loads((blank_en / "generation_config.json").read_text())["eos_token_id"]
    _write_qwen_config(blank_en, dims, eos_id)
    config = read_config(read_hyperpyyaml(out / config_file), json.loads((blank_en / "config.json").read_text()))
    for file_name, state in weights:
        torch.save(state(config), out / file_name)
    _write_campplus_standin(out / "campplus.onnx", rng)
    _write_speech_tokenizer_standin(out / speech_tokenizer_file, rng)
    return out


def make_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random CosyVoice2 model directory in the official layout; returns its path."""
    return write_model_dir(
        out_dir, size, seed,
        sizes=SIZES,
        yaml_template=_YAML_TEMPLATE,
        config_file="cosyvoice2.yaml",
        read_config=CosyVoice2Config.from_dicts,
        weights=[("llm.pt", _llm_state), ("flow.pt", _flow_state), ("hift.pt", _hift_state)],
        speech_tokenizer_file="speech_tokenizer_v2.onnx",
    )
