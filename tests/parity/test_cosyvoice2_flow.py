"""Parity of the CosyVoice2 flow (encoder + flow matching + estimator) with upstream, on the tiny golden model.

Every array of flow.npz is checked: decoder inputs, noise, estimator step 0, the non-streaming mel, the
full-sequence chunk-masked mel and the three mels of the streaming schedule upstream ran.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.engine.types import ModelFileError

MEL_ATOL = 1e-4  # golden README: features/mels within ~1e-4 abs (mels span about +-12)


@pytest.fixture(scope="module")
def golden(cosyvoice2_golden: Path) -> dict[str, np.ndarray]:
    with np.load(cosyvoice2_golden / "flow.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def flow(cosyvoice2_golden: Path) -> CosyVoice2Flow:
    torch.set_num_threads(2)
    return CosyVoice2Flow.from_pretrained(cosyvoice2_golden / "tiny")


@pytest.fixture(scope="module")
def inputs(golden: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        "token": torch.from_numpy(golden["tokens"]).unsqueeze(0),
        "prompt_token": torch.from_numpy(golden["prompt_token"]).unsqueeze(0),
        "prompt_feat": torch.from_numpy(golden["prompt_feat"]).unsqueeze(0),
        "embedding": torch.from_numpy(golden["embedding"]).unsqueeze(0),
    }


def assert_close(actual: torch.Tensor, expected: np.ndarray, atol: float, name: str) -> None:
    actual_np = actual.detach().float().cpu().numpy()
    assert actual_np.shape == expected.shape, f"{name}: shape {actual_np.shape} != golden {expected.shape}"
    diff = float(np.abs(actual_np - expected).max())
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol:g}"


def test_decoder_inputs(flow: CosyVoice2Flow, inputs: dict[str, torch.Tensor], golden: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        mu, spks, cond = flow.encode(**inputs, streaming=False, finalize=True)
    assert_close(mu[0], golden["nonstream_decoder_mu"], MEL_ATOL, "mu")
    assert_close(spks[0], golden["nonstream_decoder_spks"], MEL_ATOL, "spks")
    assert_close(cond[0], golden["nonstream_decoder_cond"], MEL_ATOL, "cond")


def test_noise_is_upstream_seed0_buffer(flow: CosyVoice2Flow, golden: dict[str, np.ndarray],
                                        settings: dict) -> None:
    frames = golden["nonstream_noise_z"].shape[1]
    assert settings["flow"]["rand_noise_matches_seed0"]
    # settings.json says how upstream drew the buffer, e.g. "...; torch.randn([1, 80, 15000]) at ...".
    shape = re.search(r"torch\.randn\(\[([\d, ]+)\]\)", settings["rand_noise"]).group(1)
    assert flow.decoder.noise.shape == tuple(int(n) for n in shape.split(","))
    np.testing.assert_array_equal(flow.decoder.noise[0, :, :frames].numpy(), golden["nonstream_noise_z"])


def test_estimator_step0(flow: CosyVoice2Flow, golden: dict[str, np.ndarray]) -> None:
    """The first Euler step's CFG batch: row 0 conditional, row 1 with mu/spks/cond zeroed, t = 0."""
    z = torch.from_numpy(golden["nonstream_noise_z"]).unsqueeze(0)
    mu = torch.from_numpy(golden["nonstream_decoder_mu"]).unsqueeze(0)
    spks = torch.from_numpy(golden["nonstream_decoder_spks"]).unsqueeze(0)
    cond = torch.from_numpy(golden["nonstream_decoder_cond"]).unsqueeze(0)
    with torch.inference_mode():
        velocity = flow.decoder.estimator(
            torch.cat([z, z]), torch.ones(2, 1, z.size(2)), torch.cat([mu, torch.zeros_like(mu)]), torch.zeros(2),
            torch.cat([spks, torch.zeros_like(spks)]), torch.cat([cond, torch.zeros_like(cond)]), streaming=False)
    assert_close(velocity, golden["nonstream_estimator_step0_out"], MEL_ATOL, "estimator step 0")


def test_nonstream_mel(flow: CosyVoice2Flow, inputs: dict[str, torch.Tensor], golden: dict[str, np.ndarray],
                       settings: dict) -> None:
    calls = 0
    estimator_forward = flow.decoder.estimator.forward

    def counting_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        return estimator_forward(*args, **kwargs)

    flow.decoder.estimator.forward = counting_forward
    try:
        mel = flow.inference(**inputs, streaming=False, finalize=True)
    finally:
        del flow.decoder.estimator.forward
    assert calls == settings["flow"]["n_estimator_calls_per_inference"]
    assert mel.dtype == torch.float32
    assert_close(mel[0], golden["nonstream_mel"], MEL_ATOL, "nonstream mel")


def test_fullseq_streaming_mask_mel(flow: CosyVoice2Flow, inputs: dict[str, torch.Tensor],
                                    golden: dict[str, np.ndarray]) -> None:
    mel = flow.inference(**inputs, streaming=True, finalize=True)
    assert_close(mel[0], golden["fullseq_streamingmask_finalize_mel"], MEL_ATOL, "full-sequence chunk-masked mel")


def test_stream_call_mels(flow: CosyVoice2Flow, inputs: dict[str, torch.Tensor], golden: dict[str, np.ndarray]) -> None:
    """Each call of the streaming schedule upstream ran (stream_call_*), on its own token prefix."""
    for call, token_len in enumerate(golden["stream_call_token_len"]):
        mel = flow.inference(
            token=inputs["token"][:, :token_len], prompt_token=inputs["prompt_token"],
            prompt_feat=inputs["prompt_feat"], embedding=inputs["embedding"],
            streaming=bool(golden["stream_call_streaming"][call]), finalize=bool(golden["stream_call_finalize"][call]))
        assert_close(mel[0], golden[f"stream_call{call}_mel"], MEL_ATOL, f"stream call {call} mel")


def test_checkpoint_mismatch_names_flow_pt(cosyvoice2_golden: Path, tmp_path: Path) -> None:
    config = CosyVoice2Config.from_model_dir(cosyvoice2_golden / "tiny")
    with pytest.raises(ModelFileError, match="flow.pt: missing"):
        CosyVoice2Flow.from_pretrained(tmp_path, config)
    state = torch.load(cosyvoice2_golden / "tiny" / "flow.pt", weights_only=True)
    del state["encoder_proj.bias"]
    torch.save(state, tmp_path / "flow.pt")
    with pytest.raises(ModelFileError, match=r"flow\.pt: does not match.*encoder_proj\.bias"):
        CosyVoice2Flow.from_pretrained(tmp_path, config)
