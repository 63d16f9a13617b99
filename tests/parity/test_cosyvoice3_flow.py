"""Parity of the CosyVoice3 flow (PreLookaheadLayer + DiT + CFM) with upstream: golden flow.npz (ladder 4).

Stage by stage from the stored inputs: decoder inputs mu/spks/cond and the noise, the DiT's intermediates at
Euler step 0 (time and input embeddings, block 0, final norm), its output with full and chunk attention, then
whole mels: non-streaming, chunk-masked on the full sequence, and the raw mel of each streaming call upstream's
tts() made (token slice, finalize and streaming flags read from the golden).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.cosyvoice3.flow import CosyVoice3Flow
from cosyapp.engine.types import ModelFileError

ATOL = 1e-4  # README: mu/spks/estimator outputs and mels within ~1e-4 abs


@pytest.fixture(scope="module")
def flow(cosyvoice3_golden: Path) -> CosyVoice3Flow:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return CosyVoice3Flow.from_pretrained(cosyvoice3_golden / "tiny")


@pytest.fixture(scope="module")
def g(cv3_npz) -> dict[str, np.ndarray]:
    return cv3_npz("flow")


def t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def inputs(g: dict[str, np.ndarray], n_tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    tokens = g["tokens"] if n_tokens is None else g["tokens"][:n_tokens]
    return t(tokens)[None], t(g["prompt_token"])[None], t(g["prompt_feat"])[None], t(g["embedding"])[None]


def close(ours: torch.Tensor, ref: np.ndarray, name: str) -> None:
    assert tuple(ours.shape) == ref.shape, f"{name}: shape {tuple(ours.shape)} != {ref.shape}"
    err = float((ours.double() - t(ref).double()).abs().max())
    assert err <= ATOL, f"{name}: max abs diff {err:.3g} > {ATOL:g}"


def cfg_batch(g: dict[str, np.ndarray], prefix: str) -> tuple[torch.Tensor, ...]:
    """Estimator inputs of Euler step 0: rows (conditional, unconditional) from the stored decoder inputs."""
    z, mu, cond, spks = (t(g[f"{prefix}_{k}"])[None] for k in ("noise_z", "decoder_mu", "decoder_cond",
                                                                 "decoder_spks"))
    return (torch.cat([z, z]), torch.ones(1, 1, z.size(2)), torch.cat([mu, torch.zeros_like(mu)]),
            t(g[f"{prefix}_estimator_step0_t"]), torch.cat([spks, torch.zeros_like(spks)]),
            torch.cat([cond, torch.zeros_like(cond)]))


def test_decoder_inputs(flow, g, cv3_settings):
    token, prompt_token, prompt_feat, embedding = inputs(g)
    assert token.size(1) == cv3_settings["n_flow_tokens"]
    assert prompt_token.size(1) == cv3_settings["flow"]["prompt_tokens"]
    with torch.inference_mode():
        mu, spks, cond = flow.encode(token, prompt_token, prompt_feat, embedding, finalize=True)
    assert mu.size(2) == cv3_settings["flow"]["nonstream_total_mel_frames"]
    close(mu[0], g["nonstream_decoder_mu"], "mu")
    close(spks[0], g["nonstream_decoder_spks"], "spks")
    close(cond[0], g["nonstream_decoder_cond"], "cond")
    close(flow.decoder.noise[0, :, :mu.size(2)], g["nonstream_noise_z"], "noise_z")
    euler_t = cv3_settings["flow"]["euler_t"]
    assert len(euler_t) == flow.decoder.n_timesteps == cv3_settings["flow"]["n_estimator_calls_per_inference"]
    close(flow.decoder.t_span[:-1], np.asarray(euler_t, dtype=np.float32), "euler t")


@torch.inference_mode()
def test_dit_intermediates(flow, g):
    x, mask, mu, time, spks, cond = cfg_batch(g, "nonstream")
    est = flow.decoder.estimator
    temb = est.time_embed(time)
    close(temb, g["nonstream_dit_time_embed"], "time_embed")
    h = est.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
    close(h, g["nonstream_dit_input_embed"], "input_embed")
    rope, attn_mask = est.rotary_embed(h.size(1)), est.attention_mask(mask, streaming=False)
    h = est.transformer_blocks[0](h, temb, attn_mask, rope)
    close(h, g["nonstream_dit_block0_out"], "block0_out")
    for block in est.transformer_blocks[1:]:
        h = block(h, temb, attn_mask, rope)
    close(est.norm_out(h, temb), g["nonstream_dit_norm_out"], "norm_out")


@torch.inference_mode()
@pytest.mark.parametrize("streaming, golden", [(False, "nonstream_estimator_step0_out"),
                                               (True, "streammask_estimator_step0_out")])
def test_estimator_step0(flow, g, cv3_settings, streaming, golden):
    assert flow.config.estimator.static_chunk_size == cv3_settings["dit_static_chunk_size"]
    close(flow.decoder.estimator(*cfg_batch(g, "nonstream"), streaming=streaming), g[golden], golden)


@pytest.mark.parametrize("streaming, golden", [(False, "nonstream_mel"), (True, "fullseq_streamingmask_finalize_mel")])
def test_full_sequence_mel(flow, g, streaming, golden):
    close(flow.inference(*inputs(g), streaming=streaming, finalize=True)[0], g[golden], golden)


def test_streaming_call_mels(flow, g, cv3_settings):
    calls = cv3_settings["stream"]["calls"]
    assert len(calls) == len(g["stream_call_token_len"])
    for i, call in enumerate(calls):
        n, finalize, streaming = (int(g[f"stream_call_{k}"][i]) for k in ("token_len", "finalize", "streaming"))
        assert (n, bool(finalize)) == (call["token_len"], call["finalize"])
        mel = flow.inference(*inputs(g, n), streaming=bool(streaming), finalize=bool(finalize))
        close(mel[0], g[f"stream_call{i}_mel"], f"stream_call{i}_mel")


def test_mismatched_checkpoint_names_flow_pt(cosyvoice3_golden, tmp_path):
    config = CosyVoice3Config.from_model_dir(cosyvoice3_golden / "tiny")
    state = torch.load(cosyvoice3_golden / "tiny" / "flow.pt", map_location="cpu", weights_only=True)
    state.pop("decoder.estimator.proj_out.bias")
    torch.save({k: v.clone() for k, v in state.items()}, tmp_path / "flow.pt")
    with pytest.raises(ModelFileError, match=r"flow\.pt.*proj_out\.bias"):
        CosyVoice3Flow.from_pretrained(tmp_path, config)
