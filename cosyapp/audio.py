"""Audio in and out of the service: decode uploads, check prompt lengths, encode float32 chunks as PCM.

The wire format of /synthesize is raw PCM, signed 16-bit little-endian, mono, at the backend's rate
(`format=wav` adds a streaming WAV header in front of the same bytes). Decoding goes through soundfile
(libsndfile), so WAV, FLAC, OGG/Vorbis/Opus and MP3 uploads at any sample rate are accepted; resampling
to what the model needs is the backend's job.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import soundfile

from cosyapp.engine.types import InputError

SAMPLE_FORMAT = "s16le"
SAMPLE_WIDTH = 2  # bytes per sample of s16le
# 0xFFFFFFFF in the RIFF and data sizes tells a reader the length is unknown (the WAV is being streamed).
_UNKNOWN_SIZE = 0xFFFFFFFF


def decode_audio(data: bytes, what: str = "prompt_wav") -> tuple[np.ndarray, int]:
    """Decode an audio file held in memory into (mono float32 samples in [-1, 1], sample rate).

    Multi-channel audio is averaged to mono. Raises InputError (safe to show) for anything unreadable.
    """
    if not data:
        raise InputError(f"{what} is empty")
    try:
        samples, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        reason = getattr(e, "error_string", None) or str(e)  # libsndfile's reason, without the BytesIO repr
        raise InputError(f"{what} is not a readable audio file (WAV, FLAC, OGG or MP3 expected): {reason}") from None
    return _mono(samples, sample_rate, what)


def read_audio_file(path: str | Path, what: str | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file on disk like `decode_audio`. Raises InputError naming the file."""
    path = Path(path)
    what = what or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror or e}") from None
    return decode_audio(data, what)


def _mono(samples: np.ndarray, sample_rate: int, what: str) -> tuple[np.ndarray, int]:
    if samples.shape[0] == 0:
        raise InputError(f"{what} contains no audio samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise InputError(f"{what} contains NaN or infinite samples")
    return np.ascontiguousarray(mono, dtype=np.float32), int(sample_rate)


def check_duration(samples: np.ndarray, sample_rate: int, min_s: float, max_s: float,
                   what: str = "prompt_wav") -> float:
    """Return the duration in seconds; raise InputError when it is outside [min_s, max_s]."""
    duration = samples.shape[0] / sample_rate
    if duration < min_s:
        raise InputError(f"{what} is too short: {duration:.2f} s, at least {min_s:g} s of speech is needed")
    if duration > max_s:
        raise InputError(f"{what} is too long: {duration:.2f} s, the limit is {max_s:g} s (3-10 s works best)")
    return duration


def to_s16le(chunk: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> signed 16-bit little-endian bytes.

    Scales by 2**15 and truncates like upstream's servers do, clipping first so that a full-scale 1.0 cannot
    wrap around to -32768.
    """
    scaled = np.clip(np.asarray(chunk, dtype=np.float32) * 32768.0, -32768.0, 32767.0)
    return scaled.astype("<i2").tobytes()


def wav_header(sample_rate: int, channels: int = 1, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM s16le WAV header. `data_bytes=None` writes the "unknown length" sizes used for streaming."""
    block_align = channels * SAMPLE_WIDTH
    if data_bytes is None:
        riff_size, data_size = _UNKNOWN_SIZE, _UNKNOWN_SIZE - 36
    else:
        riff_size, data_size = 36 + data_bytes, data_bytes
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, sample_rate * block_align, block_align,
                      8 * SAMPLE_WIDTH)
        + struct.pack("<4sI", b"data", data_size)
    )


def pcm_headers(sample_rate: int, channels: int = 1) -> dict[str, str]:
    """HTTP headers announcing the PCM layout (audio/L16 would mean big-endian, hence the X- headers)."""
    return {"X-Sample-Rate": str(sample_rate), "X-Channels": str(channels), "X-Sample-Format": SAMPLE_FORMAT}


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float32 samples -> a complete 16-bit PCM WAV file in memory."""
    return wav_header(sample_rate, 1, samples.shape[0] * SAMPLE_WIDTH) + to_s16le(samples)
