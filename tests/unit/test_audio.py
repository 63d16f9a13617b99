"""Upload decoding, prompt duration checks, s16le encoding and the WAV headers."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np
import pytest
import soundfile

from cosyapp.audio import check_duration, decode_audio, pcm_headers, read_audio_file, to_s16le, wav_bytes, wav_header
from cosyapp.engine.types import InputError


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


@pytest.mark.parametrize("fmt, subtype, rate, channels", [
    ("WAV", "PCM_16", 16000, 1), ("WAV", "PCM_24", 22050, 2), ("WAV", "FLOAT", 48000, 1),
    ("FLAC", "PCM_16", 44100, 2), ("OGG", "VORBIS", 24000, 1),
])
def test_decode_common_formats_to_mono_float32(fmt: str, subtype: str, rate: int, channels: int):
    buffer = io.BytesIO()
    soundfile.write(buffer, _tone(1.0, rate, channels), rate, format=fmt, subtype=subtype)
    samples, sample_rate = decode_audio(buffer.getvalue())
    assert sample_rate == rate and samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == rate
    tolerance = 0.05 if subtype == "VORBIS" else 1e-3
    assert np.abs(samples - _tone(1.0, rate)).max() < tolerance


def test_stereo_is_averaged():
    buffer = io.BytesIO()
    left, right = np.full(100, 0.5, np.float32), np.full(100, -0.25, np.float32)
    soundfile.write(buffer, np.stack([left, right], axis=1), 16000, format="WAV", subtype="FLOAT")
    samples, _ = decode_audio(buffer.getvalue())
    assert np.allclose(samples, 0.125)


@pytest.mark.parametrize("data, message", [
    (b"", "prompt_wav is empty"),
    (b"hello, this is text", "not a readable audio file"),
    (b"RIFF\x10\x00\x00\x00WAVEfmt ", "not a readable audio file"),
    (wav_header(16000, 1, 0), "contains no audio samples"),
])
def test_unreadable_uploads_are_input_errors(data: bytes, message: str):
    with pytest.raises(InputError, match=message) as error:
        decode_audio(data)
    assert "BytesIO" not in str(error.value)


def test_nan_samples_are_refused():
    buffer = io.BytesIO()
    soundfile.write(buffer, np.array([0.0, np.nan, 0.1], np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(InputError, match="NaN"):
        decode_audio(buffer.getvalue())


def test_read_audio_file_names_the_file(tmp_path):
    with pytest.raises(InputError, match="cannot read .*missing.wav"):
        read_audio_file(tmp_path / "missing.wav")
    (tmp_path / "x.wav").write_bytes(b"nope")
    with pytest.raises(InputError, match="x.wav is not a readable audio file"):
        read_audio_file(tmp_path / "x.wav")


def test_check_duration():
    samples = np.zeros(16000 * 3, np.float32)
    assert check_duration(samples, 16000, 0.5, 30.0) == 3.0
    with pytest.raises(InputError, match="too long: 3.00 s, the limit is 2 s"):
        check_duration(samples, 16000, 0.5, 2.0)
    with pytest.raises(InputError, match="too short"):
        check_duration(samples[:100], 16000, 0.5, 30.0)


def test_s16le_encoding_scales_clips_and_is_little_endian():
    chunk = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 0.99], np.float32)
    data = to_s16le(chunk)
    assert len(data) == 2 * len(chunk)
    values = struct.unpack("<8h", data)
    assert values == (0, 16384, -16384, 32767, -32768, 32767, -32768, int(0.99 * 32768))


def test_wav_header_known_and_streaming_lengths():
    pcm = to_s16le(_tone(0.5, 24000))
    complete = wav_header(24000, 1, len(pcm)) + pcm
    with wave.open(io.BytesIO(complete)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (24000, 1, 2, 12000)
    assert wav_bytes(_tone(0.5, 24000), 24000) == complete
    streaming = wav_header(24000) + pcm
    assert len(wav_header(24000)) == 44 and streaming[4:8] == b"\xff\xff\xff\xff"
    samples, rate = soundfile.read(io.BytesIO(streaming), dtype="int16")  # readers accept the unknown length
    assert rate == 24000 and samples.astype("<i2").tobytes() == pcm


def test_pcm_headers():
    assert pcm_headers(24000) == {"X-Sample-Rate": "24000", "X-Channels": "1", "X-Sample-Format": "s16le"}
