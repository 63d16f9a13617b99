"""Prompt-audio features of the CosyVoice2 frontend, in plain torch (+ numpy for the mel filterbanks).

Three extractors feed three models, each matching what upstream computes:

- `whisper_log_mel`: 128-bin log-mel at 100 Hz (openai-whisper's `log_mel_spectrogram`), input of the
  speech tokenizer ONNX model.
- `speaker_fbank`: Kaldi fbank at 100 Hz minus its time mean, input of the CAM++ speaker model.
- `prompt_mel`: Matcha-TTS's 80-bin log-mel at 50 Hz on 24 kHz audio, the flow model's prompt features.

The functions run on whatever device the waveform is on. The mel filterbanks are our own implementation
of librosa's Slaney-style `filters.mel`; for whisper's 80- and 128-bin banks it reproduces the shipped
`mel_filters.npz` bit for bit (checked against openai-whisper's asset).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio

from cosyapp.backends.cosyvoice2.config import MelConfig

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160

# Slaney's auditory scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: float) -> float:
    if hz < _SLANEY_BREAK_HZ:
        return hz / _SLANEY_HZ_PER_MEL
    return _SLANEY_BREAK_MEL + np.log(hz / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP


def _slaney_mel_to_hz(mels: np.ndarray) -> np.ndarray:
    hz = mels * _SLANEY_HZ_PER_MEL
    log_part = mels >= _SLANEY_BREAK_MEL
    hz[log_part] = _SLANEY_BREAK_HZ * np.exp(_SLANEY_LOG_STEP * (mels[log_part] - _SLANEY_BREAK_MEL))
    return hz


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters [n_mels, n_fft // 2 + 1], float32, area-normalised ("slaney" norm).

    Band edges are n_mels + 2 points equally spaced on the Slaney mel scale between fmin and fmax; each
    filter rises from edge i to i + 1 and falls to i + 2, and is scaled by 2 / (width in Hz) so every
    filter has the same area. Computed in float64 and rounded to float32 at the same two points librosa
    rounds (the triangle, then the scaled triangle), so the values match it bit for bit.
    """
    fmax = sample_rate / 2.0 if fmax is None else fmax
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges_hz = _slaney_mel_to_hz(np.linspace(_hz_to_slaney_mel(fmin), _hz_to_slaney_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    to_fft_bins = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, n_freqs]
    rising = -to_fft_bins[:-2] / widths[:-1, None]
    falling = to_fft_bins[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    return (triangles * area_norm[:, None]).astype(np.float32)


@functools.cache
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None,
                 device: torch.device) -> torch.Tensor:
    return torch.from_numpy(slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)).to(device)


@functools.cache
def _hann_window(length: int, device: torch.device) -> torch.Tensor:
    return torch.hann_window(length, device=device)  # periodic, as torch.stft users upstream build it


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, target_rate: int, device: torch.device) -> torchaudio.transforms.Resample:
    # Defaults (sinc_interp_hann, lowpass width 6, rolloff 0.99) = upstream's `load_wav`. The module holds
    # the precomputed polyphase kernel, so caching it per rate pair skips rebuilding it per voice; bounded
    # because uploads choose the rate.
    return torchaudio.transforms.Resample(orig_rate, target_rate).to(device)


def resample(wav: torch.Tensor, sample_rate: int, target_rate: int) -> torch.Tensor:
    """Resample [..., N] float32 audio with torchaudio's default windowed-sinc filter."""
    if sample_rate == target_rate:
        return wav
    return _resampler(sample_rate, target_rate, wav.device)(wav)


def whisper_log_mel(wav_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """[N] 16 kHz audio -> [n_mels, N // 160] whisper log-mel (the speech tokenizer's input)."""
    window = _hann_window(WHISPER_N_FFT, wav_16k.device)
    stft = torch.stft(wav_16k, WHISPER_N_FFT, WHISPER_HOP, window=window, center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2  # whisper drops the last frame
    filters = _mel_filters(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels, 0.0, None, wav_16k.device)
    log_mel = torch.clamp(filters @ power, min=1e-10).log10()
    # Keep an 80 dB dynamic range below the loudest bin, then scale to roughly [-1, 1].
    log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


def speaker_fbank(wav_16k: torch.Tensor) -> torch.Tensor:
    """[N] 16 kHz audio in [-1, 1] -> [frames, 80] Kaldi fbank minus its mean over time (CAM++'s input).

    Kaldi defaults: 25 ms povey window, 10 ms shift, pre-emphasis 0.97, DC removal, snip_edges; no dither.
    """
    feats = torchaudio.compliance.kaldi.fbank(wav_16k.unsqueeze(0), num_mel_bins=80, dither=0.0,
                                              sample_frequency=16000)
    return feats - feats.mean(dim=0, keepdim=True)


def prompt_mel(wav: torch.Tensor, mel: MelConfig) -> torch.Tensor:
    """[N] audio at `mel.sampling_rate` -> [N // hop, num_mels] natural-log mel (flow's prompt features).

    Matcha-TTS `mel_spectrogram`: reflect-pad (n_fft - hop) / 2 on both sides, un-centred STFT, magnitude
    with a 1e-9 floor inside the square root, Slaney mel filters, log of max(x, 1e-5).
    """
    pad = (mel.n_fft - mel.hop_size) // 2
    padded = F.pad(wav.view(1, 1, -1), (pad, pad), mode="reflect").view(-1)
    window = _hann_window(mel.win_size, wav.device)
    stft = torch.stft(padded, mel.n_fft, hop_length=mel.hop_size, win_length=mel.win_size, window=window,
                      center=mel.center, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    magnitude = torch.sqrt(torch.view_as_real(stft).pow(2).sum(-1) + 1e-9)
    filters = _mel_filters(mel.sampling_rate, mel.n_fft, mel.num_mels, mel.fmin, mel.fmax, wav.device)
    return torch.log(torch.clamp(filters @ magnitude, min=1e-5)).transpose(0, 1)
