"""CosyVoice2 hyperparameters, read from the official `cosyvoice2.yaml` and `CosyVoice-BlankEN/config.json`.

The yaml uses hyperpyyaml tags (`!new:`, `!name:`, `!apply:`, `!ref`). We never execute them: tagged
mappings are read as plain mappings, and `!ref` expressions (`<chunk_size> * <token_mel_ratio>`) are
resolved against the top-level keys with a tiny arithmetic evaluator.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cosyapp.backends.weights import read_json_file
from cosyapp.engine.types import ModelFileError

_REF = re.compile(r"<([^<>]+)>")


class _Ref(str):
    """An unresolved `!ref` expression."""


class _HyperLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return {"__tag__": tag_suffix, "value": value} if not isinstance(value, dict) else {"__tag__": tag_suffix, **value}


_HyperLoader.add_multi_constructor("!new:", _construct_tagged)
_HyperLoader.add_multi_constructor("!name:", _construct_tagged)
_HyperLoader.add_multi_constructor("!apply:", _construct_tagged)
_HyperLoader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv}


def _eval_arith(expr: str) -> Any:
    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"unsupported !ref expression {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _resolve(value: Any, top: dict[str, Any]) -> Any:
    if isinstance(value, _Ref):
        names = _REF.findall(value)
        if len(names) == 1 and value.strip() == f"<{names[0]}>":
            return _resolve(top[names[0]], top)
        return _eval_arith(_REF.sub(lambda m: repr(_resolve(top[m.group(1)], top)), value))
    if isinstance(value, dict):
        return {k: _resolve(v, top) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top) for v in value]
    return value


def read_hyperpyyaml(path: Path) -> dict[str, Any]:
    """Read a hyperpyyaml file as plain data (tags become `__tag__` keys, `!ref`s are resolved)."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_HyperLoader)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ModelFileError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path}: expected a mapping at the top level")
    try:
        return {k: _resolve(v, raw) for k, v in raw.items()}
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot resolve a !ref ({exc})") from exc


@dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class LLMConfig:
    llm_input_size: int
    llm_output_size: int
    speech_token_size: int  # 6561; the speech head and embedding have speech_token_size + 3 rows
    mix_ratio: tuple[int, int]
    top_p: float
    top_k: int
    win_size: int
    tau_r: float
    qwen: Qwen2Config

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.speech_token_size, self.speech_token_size + 1, self.speech_token_size + 2)


@dataclass(frozen=True)
class EncoderConfig:
    input_size: int
    output_size: int
    attention_heads: int
    linear_units: int
    num_blocks: int
    num_up_blocks: int  # hard-coded to 4 upstream
    static_chunk_size: int  # tokens; the up-sampled half uses token_mel_ratio times this


@dataclass(frozen=True)
class EstimatorConfig:
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    attention_head_dim: int
    n_blocks: int
    num_mid_blocks: int
    num_heads: int
    act_fn: str
    static_chunk_size: int  # mel frames


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int  # mel bins
    spk_embed_dim: int
    vocab_size: int
    token_mel_ratio: int
    pre_lookahead_len: int
    encoder: EncoderConfig
    estimator: EstimatorConfig
    spk_emb_dim: int  # decoder speaker projection width (80)
    inference_cfg_rate: float
    t_scheduler: str
    sigma_min: float
    n_timesteps: int = 10  # hard-coded in upstream flow.inference


@dataclass(frozen=True)
class F0PredictorConfig:
    num_class: int
    in_channels: int
    cond_channels: int


@dataclass(frozen=True)
class HiftConfig:
    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    istft_n_fft: int
    istft_hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0_predictor: F0PredictorConfig

    @property
    def upsample_scale(self) -> int:
        scale = self.istft_hop_len
        for rate in self.upsample_rates:
            scale *= rate
        return scale


@dataclass(frozen=True)
class MelConfig:
    """The prompt mel extractor (`feat_extractor` in the yaml)."""

    n_fft: int
    num_mels: int
    sampling_rate: int
    hop_size: int
    win_size: int
    fmin: float
    fmax: float | None
    center: bool


# CosyVoice2 and CosyVoice3 yamls share these keys but build different dataclasses from them, so the readers
# return keyword arguments; each version adds its own fields next to them.
def model_fields(y: dict[str, Any]) -> dict[str, int]:
    """The top-level rates and sizes of the yaml."""
    return {
        "sample_rate": int(y["sample_rate"]),
        "token_frame_rate": int(y["token_frame_rate"]),
        "token_mel_ratio": int(y["token_mel_ratio"]),
        "chunk_size": int(y["chunk_size"]),
        "spk_embed_dim": int(y["spk_embed_dim"]),
    }


def lm_fields(llm: dict[str, Any]) -> dict[str, Any]:
    """Sizes and sampling settings of the yaml's `llm` section."""
    sampling = llm["sampling"]
    return {
        "llm_input_size": int(llm["llm_input_size"]),
        "llm_output_size": int(llm["llm_output_size"]),
        "speech_token_size": int(llm["speech_token_size"]),
        "top_p": float(sampling["top_p"]),
        "top_k": int(sampling["top_k"]),
        "win_size": int(sampling["win_size"]),
        "tau_r": float(sampling["tau_r"]),
    }


def flow_fields(flow: dict[str, Any]) -> dict[str, Any]:
    """Sizes of the yaml's `flow` section and its decoder's CFM settings (not the encoder or estimator)."""
    dec = flow["decoder"]
    cfm = dec["cfm_params"]["content"]
    return {
        "input_size": int(flow["input_size"]),
        "output_size": int(flow["output_size"]),
        "spk_embed_dim": int(flow["spk_embed_dim"]),
        "vocab_size": int(flow["vocab_size"]),
        "token_mel_ratio": int(flow["token_mel_ratio"]),
        "pre_lookahead_len": int(flow["pre_lookahead_len"]),
        "spk_emb_dim": int(dec["spk_emb_dim"]),
        "inference_cfg_rate": float(cfm["inference_cfg_rate"]),
        "t_scheduler": str(cfm["t_scheduler"]),
        "sigma_min": float(cfm["sigma_min"]),
    }


def qwen2_config(q: dict[str, Any]) -> Qwen2Config:
    """The Qwen2 LM body from `CosyVoice-BlankEN/config.json` (shared by CosyVoice2 and CosyVoice3)."""
    return Qwen2Config(
        hidden_size=int(q["hidden_size"]),
        intermediate_size=int(q["intermediate_size"]),
        num_layers=int(q["num_hidden_layers"]),
        num_heads=int(q["num_attention_heads"]),
        num_kv_heads=int(q.get("num_key_value_heads", q["num_attention_heads"])),
        vocab_size=int(q["vocab_size"]),
        rms_norm_eps=float(q["rms_norm_eps"]),
        rope_theta=float(q.get("rope_theta", 10000.0)),
        max_position_embeddings=int(q.get("max_position_embeddings", 32768)),
    )


def hift_config(hift: dict[str, Any]) -> HiftConfig:
    """The vocoder from the yaml's `hift` section; both model versions use the same keys."""
    f0 = hift["f0_predictor"]
    return HiftConfig(
        in_channels=int(hift["in_channels"]),
        base_channels=int(hift["base_channels"]),
        nb_harmonics=int(hift["nb_harmonics"]),
        sampling_rate=int(hift["sampling_rate"]),
        nsf_alpha=float(hift["nsf_alpha"]),
        nsf_sigma=float(hift["nsf_sigma"]),
        nsf_voiced_threshold=float(hift["nsf_voiced_threshold"]),
        upsample_rates=tuple(int(r) for r in hift["upsample_rates"]),
        upsample_kernel_sizes=tuple(int(k) for k in hift["upsample_kernel_sizes"]),
        istft_n_fft=int(hift["istft_params"]["n_fft"]),
        istft_hop_len=int(hift["istft_params"]["hop_len"]),
        resblock_kernel_sizes=tuple(int(k) for k in hift["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in hift["resblock_dilation_sizes"]),
        source_resblock_kernel_sizes=tuple(int(k) for k in hift["source_resblock_kernel_sizes"]),
        source_resblock_dilation_sizes=tuple(
            tuple(int(d) for d in ds) for ds in hift["source_resblock_dilation_sizes"]
        ),
        lrelu_slope=float(hift["lrelu_slope"]),
        audio_limit=float(hift["audio_limit"]),
        f0_predictor=F0PredictorConfig(
            num_class=int(f0["num_class"]),
            in_channels=int(f0["in_channels"]),
            cond_channels=int(f0["cond_channels"]),
        ),
    )


def mel_config(feat: dict[str, Any]) -> MelConfig:
    """The prompt mel extractor from the yaml's `feat_extractor` section."""
    return MelConfig(
        n_fft=int(feat["n_fft"]),
        num_mels=int(feat["num_mels"]),
        sampling_rate=int(feat["sampling_rate"]),
        hop_size=int(feat["hop_size"]),
        win_size=int(feat["win_size"]),
        fmin=float(feat["fmin"]),
        fmax=None if feat["fmax"] is None else float(feat["fmax"]),
        center=bool(feat["center"]),
    )


@dataclass(frozen=True)
class CosyVoice2Config:
    sample_rate: int
    token_frame_rate: int
    token_mel_ratio: int
    chunk_size: int  # streaming chunk in tokens
    spk_embed_dim: int
    llm: LLMConfig
    flow: FlowConfig
    hift: HiftConfig
    mel: MelConfig

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "CosyVoice2Config":
        model_dir = Path(model_dir)
        yaml_path = model_dir / "cosyvoice2.yaml"
        if not yaml_path.is_file():
            raise ModelFileError(f"{yaml_path}: missing (not a CosyVoice2 model directory?)")
        qwen_raw = read_json_file(model_dir / "CosyVoice-BlankEN" / "config.json")
        return cls.from_dicts(read_hyperpyyaml(yaml_path), qwen_raw, source=str(yaml_path))

    @classmethod
    def from_dicts(cls, y: dict[str, Any], q: dict[str, Any], source: str = "cosyvoice2.yaml") -> "CosyVoice2Config":
        try:
            llm, flow, hift, feat = y["llm"], y["flow"], y["hift"], y["feat_extractor"]
            enc, est = flow["encoder"], flow["decoder"]["estimator"]
            qwen = qwen2_config(q)
            return cls(
                **model_fields(y),
                llm=LLMConfig(
                    **lm_fields(llm),
                    mix_ratio=tuple(llm.get("mix_ratio", (5, 15))),
                    qwen=qwen,
                ),
                flow=FlowConfig(
                    **flow_fields(flow),
                    encoder=EncoderConfig(
                        input_size=int(enc["input_size"]),
                        output_size=int(enc["output_size"]),
                        attention_heads=int(enc["attention_heads"]),
                        linear_units=int(enc["linear_units"]),
                        num_blocks=int(enc["num_blocks"]),
                        num_up_blocks=4,
                        static_chunk_size=int(enc["static_chunk_size"]),
                    ),
                    estimator=EstimatorConfig(
                        in_channels=int(est["in_channels"]),
                        out_channels=int(est["out_channels"]),
                        channels=tuple(int(c) for c in est["channels"]),
                        attention_head_dim=int(est["attention_head_dim"]),
                        n_blocks=int(est["n_blocks"]),
                        num_mid_blocks=int(est["num_mid_blocks"]),
                        num_heads=int(est["num_heads"]),
                        act_fn=str(est["act_fn"]),
                        static_chunk_size=int(est["static_chunk_size"]),
                    ),
                ),
                hift=hift_config(hift),
                mel=mel_config(feat),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source}: missing or malformed hyperparameter ({exc!r})") from exc
