"""HiFT vocoder parity against the upstream goldens (`hift.npz`, golden README 5.4 and 6).

Tolerances (README 5): f0 1e-2 Hz, source and waveforms 1e-3 abs (waveform peak ~0.12).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator
from cosyapp.backends.weights import load_state_dict
from cosyapp.engine.types import ModelFileError

F0_TOL = 1e-2
WAVE_TOL = 1e-3


@pytest.fixture(scope="module")
def golden(cosyvoice2_golden: Path) -> dict[str, np.ndarray]:
    return dict(np.load(cosyvoice2_golden / "hift.npz"))


def mel_of(golden: dict[str, np.ndarray], name: str) -> torch.Tensor:
    return torch.from_numpy(golden[f"{name}__mel"])[None]


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float, what: str) -> None:
    actual_np = actual.detach().cpu().numpy()
    assert actual_np.shape == expected.shape, f"{what}: shape {actual_np.shape} != golden {expected.shape}"
    err = float(np.abs(actual_np - expected).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("name", ["prompt", "flowmel"])
def test_f0(hift: HiFTGenerator, golden: dict[str, np.ndarray], name: str) -> None:
    with torch.inference_mode():
        f0 = hift.f0_predictor(mel_of(golden, name))
    assert_close(f0[0], golden[f"{name}__f0"], F0_TOL, f"{name} f0")


@pytest.mark.parametrize("name", ["prompt", "flowmel"])
def test_source_and_wav_zero_randomness(hift: HiFTGenerator, golden: dict[str, np.ndarray], name: str) -> None:
    wav, source = hift.inference(mel_of(golden, name))
    assert_close(source[0, 0], golden[f"{name}__source"], WAVE_TOL, f"{name} source")
    assert_close(wav[0], golden[f"{name}__wav"], WAVE_TOL, f"{name} wav")


def test_voiced_fraction(hift: HiFTGenerator, golden: dict[str, np.ndarray], settings: dict) -> None:
    for name in ("prompt", "flowmel"):
        with torch.inference_mode():
            f0 = hift.f0_predictor(mel_of(golden, name))[0]
        voiced = float((f0 > settings["hift"]["voiced_threshold"]).float().mean())
        assert voiced == pytest.approx(settings["hift"][f"f0_voiced_fraction_{name}"])


def test_cache_source_overwrites_source_head(hift: HiFTGenerator, golden: dict[str, np.ndarray],
                                             settings: dict) -> None:
    cache = torch.from_numpy(golden["prompt_with_cache__cache_source"])[None, None]
    wav, source = hift.inference(mel_of(golden, "prompt"), cache_source=cache)
    prefix = settings["hift_cache_check"]["prefix_len"]
    assert torch.equal(source[0, 0, :cache.shape[2]], cache[0, 0])
    assert_close(wav[0, :prefix], golden["prompt_with_cache__wav_first11520"], WAVE_TOL, "cached wav head")
    # Past the receptive field of the overwritten samples the output is the uncached one.
    assert_close(wav[0, prefix:], golden["prompt__wav"][prefix:], WAVE_TOL, "cached wav tail")


def test_seeded_matches_upstream_draws(hift: HiFTGenerator, golden: dict[str, np.ndarray], settings: dict) -> None:
    seed = settings["hift"]["seed_for_seeded_variant"]
    first_draw = torch.rand(1, 9, generator=torch.Generator().manual_seed(seed))
    assert_close(first_draw[0], golden["prompt_seeded__rand_ini_raw"], 0.0, "rand_ini draw")

    wav, _ = hift.inference(mel_of(golden, "prompt"), generator=torch.Generator().manual_seed(seed))
    assert_close(wav[0], golden["prompt_seeded__wav"], WAVE_TOL, "seeded wav")
    # The noise is visible at this tolerance: a zero-randomness run could not pass the check above.
    assert float(np.abs(golden["prompt_seeded__wav"] - golden["prompt__wav"]).max()) > WAVE_TOL
    other, _ = hift.inference(mel_of(golden, "prompt"), generator=torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(other, wav)


def test_contiguous_noise_order_draws_the_same_kind_of_noise(hift: HiFTGenerator, golden: dict[str, np.ndarray],
                                                            settings: dict) -> None:
    """The serving path's faster draw: reproducible per seed, and as much noise as upstream's draw order."""
    seed = settings["hift"]["seed_for_seeded_variant"]
    mel = mel_of(golden, "prompt")
    quiet, _ = hift.inference(mel)
    upstream_order, _ = hift.inference(mel, generator=torch.Generator().manual_seed(seed))
    hift.m_source.upstream_noise_order = False
    try:
        fast, _ = hift.inference(mel, generator=torch.Generator().manual_seed(seed))
        again, _ = hift.inference(mel, generator=torch.Generator().manual_seed(seed))
    finally:
        hift.m_source.upstream_noise_order = True
    assert torch.equal(fast, again)
    assert not torch.equal(fast, upstream_order)
    fast_noise = float((fast - quiet).pow(2).mean().sqrt())
    upstream_noise = float((upstream_order - quiet).pow(2).mean().sqrt())
    assert 0.8 < fast_noise / upstream_noise < 1.25


def test_zero_randomness_is_reproducible(hift: HiFTGenerator, golden: dict[str, np.ndarray], settings: dict) -> None:
    frames = 40
    mel = mel_of(golden, "prompt")[:, :, :frames]
    first, _ = hift.inference(mel)
    second, _ = hift.inference(mel)
    assert torch.equal(first, second)
    assert first.shape == (1, frames * settings["hift"]["upsample_scale"])


def test_loads_legacy_weight_norm_and_generator_prefix(tmp_path: Path, cosyvoice2_golden: Path,
                                                       config: CosyVoice2Config, hift: HiFTGenerator) -> None:
    state = load_state_dict(cosyvoice2_golden / "tiny" / "hift.pt")
    renamed = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        renamed["generator." + key] = value
    torch.save(renamed, tmp_path / "hift.pt")
    legacy = HiFTGenerator.from_pretrained(tmp_path, config)
    for key, value in hift.state_dict().items():
        assert torch.equal(legacy.state_dict()[key], value), key


def test_mismatched_checkpoint_names_the_file(tmp_path: Path, cosyvoice2_golden: Path,
                                              config: CosyVoice2Config) -> None:
    state = load_state_dict(cosyvoice2_golden / "tiny" / "hift.pt")
    del state["conv_post.bias"]
    torch.save(state, tmp_path / "hift.pt")
    with pytest.raises(ModelFileError, match=r"hift\.pt.*conv_post\.bias"):
        HiFTGenerator.from_pretrained(tmp_path, config)
