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


@pytest.fixture(scope="module")
def codec(fish_backend):
    return fish_backend.codec


@pytest.fixture(scope="module")
def reference_audio(fish_golden) -> torch.Tensor:
    pcm, rate = sf.read(fish_golden / "reference.wav", dtype="int16")
    assert rate == 44100
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
    assert audio.shape[0] == fish_goldens_json["decode_returned_audio_lengths"] == codes.shape[-1] * 2048
    np.testing.assert_allclose(audio.numpy(), golden["ref_decoded"], rtol=0, atol=AUDIO_ATOL)


def test_decode_clamps_a_copy_of_out_of_range_codes(codec, fish_npz, fish_goldens_json):
    golden = fish_npz("codec")
    codes = torch.from_numpy(golden["rand_codes"].copy())[None]
    assert (codes[0, 1:] > 1023).any()  # the golden grid exercises the clamp
    audio = codec.decode(codes)[0, 0]
    np.testing.assert_allclose(audio.numpy(), golden["rand_decoded"], rtol=0, atol=AUDIO_ATOL)
    assert not fish_goldens_json["rand_codes_modified_in_place_by_decode"]
    np.testing.assert_array_equal(codes[0].numpy(), golden["rand_codes"])


@pytest.mark.parametrize("chunks", [[1, 3, 8, 16, 50, 58], [4] + [16] * 8 + [4]])
def test_streaming_decode_equals_golden_decode(codec, fish_npz, chunks):
    """The incremental decoder (conv context, windowed KV) reproduces the one-shot decode, chunking aside."""
    golden = fish_npz("codec")
    codes = torch.from_numpy(golden["rand_codes"])[None]
    assert sum(chunks) == codes.shape[-1]
    stream, pieces, start = DecodeStream(codec), [], 0
    for n in chunks:
        piece = stream.push(codes[..., start:start + n])
        assert piece.shape[-1] == n * 2048
        pieces.append(piece[0, 0])
        start += n
    np.testing.assert_allclose(torch.cat(pieces).numpy(), golden["rand_decoded"], rtol=0, atol=AUDIO_ATOL)


def test_reference_resampling(fish_npz):
    golden = fish_npz("codec")
    pcm = golden["resample_in_int16_22050"].astype(np.float32) / 32768
    ours = resample_to_codec_rate(pcm, 22050)
    np.testing.assert_allclose(ours.numpy(), golden["resample_out_44100"], rtol=0, atol=1e-6)
