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
# The output rates a request may ask for (`sample_rate`): what devices play and every output format can carry.
SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
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


def harmonic_tone(sample_rate: int, seconds: float = 4.0) -> np.ndarray:
    """A 140 Hz tone with a 3 Hz tremolo, float32: stands in for a prompt recording where none is at hand."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.2 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


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


# Complete-file formats of `encode_audio` and their HTTP media types (the Fish API's `format` field).
AUDIO_MEDIA_TYPES = {
    "wav": "audio/wav",
    "pcm": "application/octet-stream",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
}
# libsndfile's Opus encoder takes only these rates; other rates are resampled to 48 kHz first.
OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)


def _sndfile_bytes(samples: np.ndarray, sample_rate: int, container: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    endian = "LITTLE" if container == "RAW" else "FILE"
    soundfile.write(buffer, samples, sample_rate, format=container, subtype=subtype, endian=endian)
    return buffer.getvalue()


def encode_audio(samples: np.ndarray, sample_rate: int, audio_format: str) -> bytes:
    """Mono float32 samples in [-1, 1] -> a complete file in `audio_format` (a key of AUDIO_MEDIA_TYPES):
    wav (16-bit PCM), pcm (raw s16le), mp3 (MPEG layer III), opus (Ogg Opus; resampled to 48 kHz unless the
    rate is one Opus supports), flac (16-bit). Blocking (mp3/opus encoding takes a while): run it off the loop.

    Everything goes through libsndfile, whose float -> int16 conversion (floor, clipped) is the one upstream
    Fish Speech's non-streaming answers have."""
    samples = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1), -1.0, 1.0)
    if audio_format == "wav":
        return _sndfile_bytes(samples, sample_rate, "WAV", "PCM_16")
    if audio_format == "pcm":
        return _sndfile_bytes(samples, sample_rate, "RAW", "PCM_16")
    if audio_format == "mp3":
        return _sndfile_bytes(samples, sample_rate, "MP3", "MPEG_LAYER_III")
    if audio_format == "flac":
        return _sndfile_bytes(samples, sample_rate, "FLAC", "PCM_16")
    if audio_format == "opus":
        if sample_rate not in OPUS_SAMPLE_RATES:
            import torch
            import torchaudio.functional as AF

            samples = AF.resample(torch.from_numpy(samples), sample_rate, 48000).clamp(-1.0, 1.0).numpy()
            sample_rate = 48000
        return _sndfile_bytes(samples, sample_rate, "OGG", "OPUS")
    raise ValueError(f"unknown audio format {audio_format!r}; known: {', '.join(AUDIO_MEDIA_TYPES)}")


# MPEG audio layer III frame headers: kbit/s by bitrate index, and Hz by sample-rate index, per MPEG version
# (header bits 19-20: 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5).
_MP3_KBPS = {3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
             2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frame_length(data: bytes, at: int = 0) -> int | None:
    """Bytes of the MPEG layer III frame whose header starts at `at`; None when no such header is there."""
    header = data[at:at + 4]
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0 or (header[1] >> 1) & 3 != 1:
        return None
    version, bitrate_index, rate_index = (header[1] >> 3) & 3, header[2] >> 4, (header[2] >> 2) & 3
    if version == 1 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    kbps = _MP3_KBPS[3 if version == 3 else 2][bitrate_index]
    samples_per_frame = 1152 if version == 3 else 576
    return samples_per_frame // 8 * kbps * 1000 // _MP3_RATES[version][rate_index] + ((header[2] >> 1) & 1)


def mp3_stream_piece(data: bytes) -> bytes:
    """An MP3 file from `encode_audio` as a piece of a longer MP3 stream: without its leading Xing/Info frame,
    which gives the frame count of this piece alone (a player that reads it stops there when pieces follow
    one another in one stream). Data that does not start with such a frame is returned as it is."""
    length = mp3_frame_length(data)
    if length is not None and (b"Xing" in data[:length] or b"Info" in data[:length]):
        return data[length:]
    return data
