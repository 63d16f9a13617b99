"""CosyVoice3 hyperparameters, read as data from the official `cosyvoice3.yaml` and `CosyVoice-BlankEN/config.json`.

The yaml is read like CosyVoice2's (`read_hyperpyyaml`: tags become plain mappings, `!ref`s are resolved). What
differs from CosyVoice2 is the model structure: the LM has a 200-id stop range and no `llm_embedding`, flow is a
PreLookaheadLayer + DiT (no conformer), and HiFT is causal with a right look-ahead for its first convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyapp.backends.cosyvoice2.config import F0PredictorConfig, HiftConfig, MelConfig, Qwen2Config, read_hyperpyyaml
from cosyapp.backends.weights import read_json_file
from cosyapp.engine.types import ModelFileError

CONFIG_FILE = "cosyvoice3.yaml"
# Upstream hard-codes these outside the yaml.
NUM_STOP_IDS = 200  # ids speech_token_size .. +199 all end decoding
SILENT_TOKENS = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)  # FSQ silence/breath tokens
MAX_SILENT_RUN = 5  # later tokens of a longer run of silent tokens are not passed to flow


@dataclass(frozen=True)
class LMConfig:
    llm_input_size: int
    llm_output_size: int
    speech_token_size: int  # 6561; sos = +0, eos = +1, task_id = +2, fill = +3; every id >= it stops decoding
    top_p: float
    top_k: int
    win_size: int
    tau_r: float
    qwen: Qwen2Config

    @property
    def num_speech_ids(self) -> int:
        return self.speech_token_size + NUM_STOP_IDS

    @property
    def sos(self) -> int:
        return self.speech_token_size

    @property
    def task_id(self) -> int:
        return self.speech_token_size + 2


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int
    mel_dim: int
    mu_dim: int
    spk_dim: int
    out_channels: int
    static_chunk_size: int  # mel frames of the streaming chunk mask
    num_decoding_left_chunks: int  # < 0: all left chunks
    freq_embed_dim: int = 256  # hard-coded upstream
    conv_pos_kernel: int = 31
    conv_pos_groups: int = 16


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int  # mel bins
    spk_embed_dim: int
    vocab_size: int
    token_mel_ratio: int
    pre_lookahead_len: int
    pre_lookahead_channels: int
    estimator: DiTConfig
    spk_emb_dim: int
    inference_cfg_rate: float
    t_scheduler: str
    sigma_min: float
    n_timesteps: int = 10  # hard-coded in upstream flow.inference


@dataclass(frozen=True)
class CosyVoice3Config:
    sample_rate: int
    token_frame_rate: int
    token_mel_ratio: int
    chunk_size: int  # streaming hop in tokens
    spk_embed_dim: int
    llm: LMConfig
    flow: FlowConfig
    hift: HiftConfig
    conv_pre_look_right: int  # HiFT conv_pre's right context, in mel frames
    mel: MelConfig

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "CosyVoice3Config":
        model_dir = Path(model_dir)
        yaml_path = model_dir / CONFIG_FILE
        if not yaml_path.is_file():
            raise ModelFileError(f"{yaml_path}: missing (not a CosyVoice3 model directory?)")
        hyper = read_hyperpyyaml(yaml_path)
        qwen_raw = read_json_file(model_dir / "CosyVoice-BlankEN" / "config.json")
        return cls.from_dicts(hyper, qwen_raw, source=str(yaml_path))

    @classmethod
    def from_dicts(cls, y: dict[str, Any], q: dict[str, Any], source: str = CONFIG_FILE) -> "CosyVoice3Config":
        try:
            llm, flow, hift, feat = y["llm"], y["flow"], y["hift"], y["feat_extractor"]
            dec, pre = flow["decoder"], flow["pre_lookahead_layer"]
            dit, cfm = dec["estimator"], dec["cfm_params"]["content"]
            sampling, f0 = llm["sampling"], hift["f0_predictor"]
            qwen = Qwen2Config(
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
            return cls(
                sample_rate=int(y["sample_rate"]),
                token_frame_rate=int(y["token_frame_rate"]),
                token_mel_ratio=int(y["token_mel_ratio"]),
                chunk_size=int(y["chunk_size"]),
                spk_embed_dim=int(y["spk_embed_dim"]),
                llm=LMConfig(
                    llm_input_size=int(llm["llm_input_size"]),
                    llm_output_size=int(llm["llm_output_size"]),
                    speech_token_size=int(llm["speech_token_size"]),
                    top_p=float(sampling["top_p"]),
                    top_k=int(sampling["top_k"]),
                    win_size=int(sampling["win_size"]),
                    tau_r=float(sampling["tau_r"]),
                    qwen=qwen,
                ),
                flow=FlowConfig(
                    input_size=int(flow["input_size"]),
                    output_size=int(flow["output_size"]),
                    spk_embed_dim=int(flow["spk_embed_dim"]),
                    vocab_size=int(flow["vocab_size"]),
                    token_mel_ratio=int(flow["token_mel_ratio"]),
                    pre_lookahead_len=int(flow["pre_lookahead_len"]),
                    pre_lookahead_channels=int(pre["channels"]),
                    estimator=DiTConfig(
                        dim=int(dit["dim"]),
                        depth=int(dit["depth"]),
                        heads=int(dit["heads"]),
                        dim_head=int(dit["dim_head"]),
                        ff_mult=int(dit.get("ff_mult", 4)),
                        mel_dim=int(dit["mel_dim"]),
                        mu_dim=int(dit.get("mu_dim") or dit["mel_dim"]),
                        spk_dim=int(dit["spk_dim"]),
                        out_channels=int(dit["out_channels"]),
                        static_chunk_size=int(dit["static_chunk_size"]),
                        num_decoding_left_chunks=int(dit.get("num_decoding_left_chunks", -1)),
                    ),
                    spk_emb_dim=int(dec["spk_emb_dim"]),
                    inference_cfg_rate=float(cfm["inference_cfg_rate"]),
                    t_scheduler=str(cfm["t_scheduler"]),
                    sigma_min=float(cfm["sigma_min"]),
                ),
                hift=HiftConfig(
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
                ),
                conv_pre_look_right=int(hift.get("conv_pre_look_right", 4)),
                mel=MelConfig(
                    n_fft=int(feat["n_fft"]),
                    num_mels=int(feat["num_mels"]),
                    sampling_rate=int(feat["sampling_rate"]),
                    hop_size=int(feat["hop_size"]),
                    win_size=int(feat["win_size"]),
                    fmin=float(feat["fmin"]),
                    fmax=None if feat["fmax"] is None else float(feat["fmax"]),
                    center=bool(feat["center"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source}: missing or malformed hyperparameter ({exc!r})") from exc
