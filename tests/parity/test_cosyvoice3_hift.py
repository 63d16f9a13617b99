"""Parity of the CosyVoice3 causal HiFT with upstream: golden hift.npz (ladder 5).

f0 (float64), the fixed construction-time source noise (from the recorded RNG state and from our replay of
the construction recipe), the harmonic source, conv_pre/conv_post intermediates and the waveform, for the
prompt mel and a flow mel, finalized and not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.cosyvoice3.hift import CausalHiFTGenerator, source_noise_state
from cosyapp.engine.types import ModelFileError

F0_ATOL = 1e-3  # Hz; README: HiFT f0 within ~1e-3 Hz
WAV_ATOL = 1e-4  # README: sources/waveforms within ~1e-4 abs
ATOL = 1e-4  # intermediates


@pytest.fixture(scope="module")
def config(cosyvoice3_golden: Path) -> CosyVoice3Config:
    return CosyVoice3Config.from_model_dir(cosyvoice3_golden / "tiny")


@pytest.fixture(scope="module")
def hift(cosyvoice3_golden: Path, config: CosyVoice3Config) -> CausalHiFTGenerator:
    return CausalHiFTGenerator.from_pretrained(cosyvoice3_golden / "tiny", config)


@pytest.fixture(scope="module")
def g(cv3_npz) -> dict[str, np.ndarray]:
    return cv3_npz("hift")


def close(ours: torch.Tensor, ref: np.ndarray, atol: float, name: str) -> None:
    assert tuple(ours.shape) == ref.shape, f"{name}: shape {tuple(ours.shape)} != {ref.shape}"
    err = float((ours.double() - torch.from_numpy(ref).double()).abs().max())
    assert err <= atol, f"{name}: max abs diff {err:.3g} > {atol:g}"


def test_fixed_noise(hift, config, g, cv3_settings):
    assert cv3_settings["hift"]["f0_cond_channels"] == config.hift.f0_predictor.cond_channels
    assert torch.equal(source_noise_state(config), torch.from_numpy(g["noise_rng_state"]))
    fixed = hift.m_source.fixed
    assert torch.equal(fixed.initial_phase[0], torch.from_numpy(g["noise_rand_ini"]))
    head = g["noise_sine_waves_head"]
    assert torch.equal(fixed.noise(head.shape[0])[0], torch.from_numpy(head))
    # Drawn lazily in blocks: a longer request keeps the prefix.
    assert torch.equal(fixed.noise(fixed.block + 1)[0, :head.shape[0]], torch.from_numpy(head))


@pytest.mark.parametrize("name", ["prompt", "flowmel"])
def test_f0_source_and_waveform(hift, g, cv3_settings, name):
    mel = torch.from_numpy(g[f"{name}__mel"])[None]
    with torch.inference_mode():
        f0 = hift.f0_predictor(mel)
        wav, source = hift.inference(mel)
    assert f0.dtype == torch.float64
    close(f0[0], g[f"{name}__f0"], F0_ATOL, f"{name} f0")
    voiced = float((f0 > cv3_settings["hift"]["voiced_threshold"]).double().mean())
    assert voiced == pytest.approx(cv3_settings["hift"][f"f0_voiced_fraction_{name}"], abs=1e-9)
    close(source[0, 0], g[f"{name}__source"], WAV_ATOL, f"{name} source")
    close(wav[0], g[f"{name}__wav"], WAV_ATOL, f"{name} wav")


@torch.inference_mode()
def test_decode_intermediates(hift, g):
    mel = torch.from_numpy(g["flowmel__mel"])[None]
    stages: dict[str, torch.Tensor] = {}
    hift.decode(mel, hift.source(hift.f0_predictor(mel)), finalize=True, stage_out=stages)
    close(stages["conv_pre"][0], g["flowmel__conv_pre_out"], ATOL, "conv_pre_out")
    head = g["flowmel__conv_post_out_head"]
    close(stages["conv_post"][0, :, :head.shape[1]], head, ATOL, "conv_post_out_head")


def test_non_final_call(hift, g, cv3_settings):
    mel = torch.from_numpy(g["flowmel__mel"])[None]
    with torch.inference_mode():
        f0 = hift.f0_predictor(mel, finalize=False)
        wav, _ = hift.inference(mel, finalize=False)
    close(f0[0], g["flowmel_nonfinal__f0"], F0_ATOL, "non-final f0")
    assert wav.shape[1] == cv3_settings["hift"]["flowmel_nonfinal_wav_len"]
    close(wav[0], g["flowmel__wav"][:wav.shape[1]], WAV_ATOL, "non-final wav vs final prefix")


def test_missing_hift_pt_is_named(config, tmp_path):
    with pytest.raises(ModelFileError, match=r"hift\.pt"):
        CausalHiFTGenerator.from_pretrained(tmp_path, config)
