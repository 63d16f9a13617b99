"""CosyVoice3 hyperparameters, read as data from the official `cosyvoice3.yaml` and `CosyVoice-BlankEN/config.json`.

The yaml is read like CosyVoice2's (`read_hyperpyyaml`: tags become plain mappings, `!ref`s are resolved). What
differs from CosyVoice2 is the model structure: the LM has a 200-id stop range and no `llm_embedding`, flow is a
PreLookaheadLayer + DiT (no conformer), and HiFT is causal with a right look-ahead for its first convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosyapp.backends.cosyvoice2.config import (
    HiftConfig,
    MelConfig,
    Qwen2Config,
    flow_fields,
    hift_config,
    lm_fields,
    mel_config,
    model_fields,
    qwen2_config,
    read_hyperpyyaml,
)
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
            pre, dit = flow["pre_lookahead_layer"], flow["decoder"]["estimator"]
            qwen = qwen2_config(q)
            return cls(
                **model_fields(y),
                llm=LMConfig(**lm_fields(llm), qwen=qwen),
                flow=FlowConfig(
                    **flow_fields(flow),
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
                ),
                hift=hift_config(hift),
                conv_pre_look_right=int(hift.get("conv_pre_look_right", 4)),
                mel=mel_config(feat),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source}: missing or malformed hyperparameter ({exc!r})") from exc
