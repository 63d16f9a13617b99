"""Fish S1 codec (modded DAC) encode/decode and intermediates against the golden set (README 6.5, 7).

Tolerances (README 7): latents/intermediates and decoded audio 2e-4 abs; codes exact wherever the golden
nearest-codeword margin is clear of our latent deviation (codes inside that margin may legitimately flip)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from cosyapp.backends.fish.backend import resample_to_codec_rate
from cosyapp.backends.fish.codec import DecodeStream

LATENT_ATOL = 2e-4
AUDIO_ATOL = 2e-4
# Streaming decode pushes: these sizes first (cut to the codes there are), then the rest in one push.
PUSH_PATTERNS = {"growing": [1, 3, 8, 16, 50], "even": [4] + [16] * 8}


@pytest.fixture(scope="module")
def codec(fish_backend):
    return fish_backend.codec


@pytest.fixture(scope="module")
def reference_audio(fish_golden, fish_goldens_json) -> torch.Tensor:
    pcm, rate = sf.read(fish_golden / "reference.wav", dtype="int16")
    assert rate == fish_goldens_json["codec"]["sample_rate"]
    return torch.from_numpy(pcm.astype(np.float32) / 32768)


def _assert_codes(codes: np.ndarray, golden: np.ndarray, margin: np.ndarray, latent_error: float) -> None:
    assert codes.shape == golden.shape
    flipped = codes != golden
    # A code may only differ where the golden search was closer than twice our latent deviation.
    assert not (flipped & (margin > 2 * latent_error)).any(), np.argwhere(flipped & (margin > 2 * latent_error))


def _encode_intermediates(codec, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    padded = F.pad(audio, (0, -audio.shape[-1] % codec.cfg.frame_length))[None, None]
    with torch.inference_mode():
        latent = codec.encoder(padded)
        quantizer_in = codec.quantizer.prepare(latent)
        codes = codec.quantizer.quantize(quantizer_in)
    return latent[0], quantizer_in[0], codes[0]


def test_encode_reference(codec, reference_audio, fish_npz, fish_goldens_json):
    golden = fish_npz("codec")
    latent, quantizer_in, codes = _encode_intermediates(codec, reference_audio)
    np.testing.assert_allclose(latent.numpy(), golden["ref_encoder_out"], rtol=0, atol=LATENT_ATOL)
    np.testing.assert_allclose(quantizer_in.numpy(), golden["ref_quantizer_in"], rtol=0, atol=LATENT_ATOL)
    error = float(np.abs(quantizer_in.numpy() - golden["ref_quantizer_in"]).max())
    _assert_codes(codes.numpy(), golden["ref_codes"], golden["ref_codes_margin"], error)
    assert reference_audio.shape[0] == fish_goldens_json["ref_num_samples"]
    assert codes.shape[1] == fish_goldens_json["ref_num_frames"]
    # The public entry point (what prepare_voice uses) gives the same codes.
    np.testing.assert_array_equal(codec.encode(reference_audio[None, None])[0].numpy(), codes.numpy())


def test_encode_longer_than_the_attention_window(codec, reference_audio, fish_npz, fish_goldens_json):
    golden = fish_npz("codec")
    audio = torch.cat([reference_audio, reference_audio])
    latent, quantizer_in, codes = _encode_intermediates(codec, audio)
    assert latent.shape[1] == fish_goldens_json["long_encoder_latent_frames"]
    assert codes.shape[1] == fish_goldens_json["long_feature_len_returned"]
    np.testing.assert_allclose(quantizer_in.numpy(), golden["long_quantizer_in"], rtol=0, atol=LATENT_ATOL)
    error = float(np.abs(quantizer_in.numpy() - golden["long_quantizer_in"]).max())
    _assert_codes(codes.numpy(), golden["long_codes"], golden["long_codes_margin"], error)


def test_decode_reference_codes(codec, fish_npz, fish_goldens_json):
    golden = fish_npz("codec")
    codes = torch.from_numpy(golden["ref_codes"])[None]
    with torch.inference_mode():
        decoder_in = codec.quantizer.decode(codes)
    np.testing.assert_allclose(decoder_in[0].numpy(), golden["ref_decoder_in"], rtol=0, atol=LATENT_ATOL)
    audio = codec.decode(codes)[0, 0]
    frame_length = fish_goldens_json["codec"]["frame_length"]
    assert audio.shape[0] == fish_goldens_json["decode_returned_audio_lengths"] == codes.shape[-1] * frame_length
    np.testing.assert_allclose(audio.numpy(), golden["ref_decoded"], rtol=0, atol=AUDIO_ATOL)


def test_decode_clamps_a_copy_of_out_of_range_codes(codec, fish_npz, fish_goldens_json):
    golden = fish_npz("codec")
    codes = torch.from_numpy(golden["rand_codes"].copy())[None]
    # The golden grid exercises the clamp: residual codes past their codebook.
    assert (codes[0, 1:] >= fish_goldens_json["codec"]["residual_codebook_size"]).any()
    audio = codec.decode(codes)[0, 0]
    np.testing.assert_allclose(audio.numpy(), golden["rand_decoded"], rtol=0, atol=AUDIO_ATOL)
    assert not fish_goldens_json["rand_codes_modified_in_place_by_decode"]
    np.testing.assert_array_equal(codes[0].numpy(), golden["rand_codes"])


def _push_sizes(first: list[int], frames: int) -> list[int]:
    sizes, left = [], frames
    for n in first:
        if left:
            sizes.append(min(n, left))
            left -= sizes[-1]
    return sizes + [left] if left else sizes


@pytest.mark.parametrize("pattern", PUSH_PATTERNS)
def test_streaming_decode_equals_golden_decode(codec, fish_npz, fish_goldens_json, pattern):
    """The incremental decoder (conv context, windowed KV) reproduces the one-shot decode, chunking aside."""
    golden = fish_npz("codec")
    codes = torch.from_numpy(golden["rand_codes"])[None]
    chunks = _push_sizes(PUSH_PATTERNS[pattern], codes.shape[-1])
    stream, pieces, start = DecodeStream(codec), [], 0
    for n in chunks:
        piece = stream.push(codes[..., start:start + n])
        assert piece.shape[-1] == n * fish_goldens_json["codec"]["frame_length"]
        pieces.append(piece[0, 0])
        start += n
    np.testing.assert_allclose(torch.cat(pieces).numpy(), golden["rand_decoded"], rtol=0, atol=AUDIO_ATOL)


def test_reference_resampling(fish_npz, fish_goldens_json):
    golden = fish_npz("codec")
    # The arrays' names carry their rates: resample_in_int16_<rate in>, resample_out_<codec rate>.
    (name,) = (key for key in golden if key.startswith("resample_in_int16_"))
    rate = int(name.rsplit("_", 1)[1])
    pcm = golden[name].astype(np.float32) / 32768
    ours = resample_to_codec_rate(pcm, rate)
    expected = golden[f"resample_out_{fish_goldens_json['codec']['sample_rate']}"]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)
