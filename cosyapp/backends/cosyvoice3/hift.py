"""CosyVoice3's causal HiFT vocoder (upstream `CausalHiFTGenerator`): mel [B, 80, T] -> 24 kHz waveform.

The same HiFT design as CosyVoice2's (f0 -> harmonic source -> STFT-domain generator -> iSTFT), made causal:
every convolution is padded on the left only, except the f0 predictor's first conv (3 frames of right context)
and conv_pre (4 frames); up-sampling is nearest + causal conv instead of a transposed conv. With
`finalize=False` those right contexts come from the last mel frames instead of zero padding, so a non-final
call on T frames yields (T - 8) * 480 samples that the final call reproduces.

Two upstream behaviours are kept for parity:
- The f0 predictor runs in float64 (upstream: "precision is crucial for causal inference").
- The source has NO randomness at inference: its initial phases and additive noise were drawn once, when the
  module was built, from the global RNG in a fixed state (`source_noise_state`). The noise is uniform [0, 1)
  (not Gaussian) and the phase is up-sampled nearest (not linear).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyapp.backends.cosyvoice2.hift import HiFTStages, SnakeResBlock
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.weights import check_keys, fold_weight_norm, load_state_dict

F0_RIGHT_CONTEXT = 3  # the f0 predictor's first conv (k=4) looks 3 frames ahead
NOISE_BLOCK_SECONDS = 30  # the fixed noise is drawn in blocks of this many seconds as utterances need it


def causal_padding(kernel_size: int, dilation: int = 1) -> int:
    """Upstream CausalConv1d's pad: (k - 1) * d for odd kernels, k - 1 for even ones (dilation 1)."""
    return (kernel_size * dilation - dilation) // 2 * 2 + (kernel_size + 1) % 2


class CausalConv1d(nn.Conv1d):
    """Conv1d padded with zeros on the left (or, `right=True`, on the right: look-ahead) to keep its length."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 right: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.pad = causal_padding(kernel_size, dilation)
        self.right = right

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """`context` (right convs only): the `pad` real frames after x, used instead of zeros."""
        if context is not None:
            return super().forward(torch.cat([x, context], dim=2))
        return super().forward(F.pad(x, (0, self.pad) if self.right else (self.pad, 0)))


class CausalUpsample(nn.Conv1d):
    """Nearest up-sampling by `rate`, then a conv left-padded by kernel_size - 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size)
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=float(self.rate), mode="nearest")
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


class CausalDownsample(nn.Conv1d):
    """Strided conv (kernel 2 * rate) left-padded by rate - 1."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__(in_channels, out_channels, 2 * rate, stride=rate)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.stride[0] - 1, 0)))


class CausalResBlock(SnakeResBlock):
    """Per dilation: Snake -> dilated causal conv -> Snake -> causal conv, with a residual around each pair."""

    @staticmethod
    def conv(channels: int, kernel_size: int, dilation: int) -> nn.Module:
        return CausalConv1d(channels, channels, kernel_size, dilation)


class CausalF0Predictor(nn.Module):
    """Upstream `CausalConvRNNF0Predictor`: conv k4 (3 frames look-ahead) + 4 x causal conv k3, ELU after each,
    linear, abs. Built in float64."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(in_channels, cond_channels, F0_RIGHT_CONTEXT + 1, right=True),
                                   nn.ELU()]
        for _ in range(4):
            layers += [CausalConv1d(cond_channels, cond_channels, 3), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # convs at even indices, as in the checkpoint
        self.classifier = nn.Linear(cond_channels, num_class)
        self.double()

    def forward(self, mel: Tensor, finalize: bool = True) -> Tensor:
        """mel [B, 80, T] -> f0 [B, T] (finalize) or [B, T - 3] (the last 3 frames are look-ahead), float64."""
        x = mel.double()
        first = self.condnet[0]
        x = first(x) if finalize else first(x[:, :, :-first.pad], x[:, :, -first.pad:])
        x = self.condnet[1:](x)
        return self.classifier(x.transpose(1, 2)).squeeze(-1).abs()


def source_noise_state(config: CosyVoice3Config) -> Tensor:
    """The CPU RNG state upstream's SineGen2 draws its fixed noise from.

    Building the model seeds torch with 0 inside the flow's CFM, which then draws its noise; the flow's token
    embedding and speaker projection and the f0 predictor's layers are initialised next, and then SineGen2
    draws. Replaying exactly those draws (inside a forked RNG, leaving the caller's alone) gives the state.
    """
    flow, f0 = config.flow, config.hift.f0_predictor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.randn([1, flow.output_size, 15000])
        nn.Embedding(flow.vocab_size, flow.input_size)
        nn.Linear(flow.spk_embed_dim, flow.output_size)
        nn.Conv1d(f0.in_channels, f0.cond_channels, F0_RIGHT_CONTEXT + 1)
        for _ in range(4):
            nn.Conv1d(f0.cond_channels, f0.cond_channels, 3)
        nn.Linear(f0.cond_channels, f0.num_class)
        return torch.get_rng_state()


class FixedSourceNoise:
    """SineGen2's construction-time draws: `rand(1, harmonics)` initial phases (harmonic 0 zeroed), then
    uniform noise `rand(1, L, harmonics)`, of which a call on L samples uses the first L rows. The noise is a
    prefix of one stream, so it is drawn lazily in blocks (upstream holds 300 s, ~260 MB, per model)."""

    def __init__(self, state: Tensor, harmonics: int, block: int) -> None:
        self.state, self.harmonics, self.block = state, harmonics, block
        generator = torch.Generator().set_state(state)
        self.initial_phase = torch.rand(1, harmonics, generator=generator)
        self.initial_phase[:, 0] = 0
        self._noise = torch.empty(1, 0, harmonics)

    def noise(self, length: int) -> Tensor:
        """[1, length, harmonics] float32 (CPU)."""
        noise = self._noise  # read once: another stream's vocoder call may be growing it on another thread
        if noise.size(1) < length:
            generator = torch.Generator().set_state(self.state)
            torch.rand(1, self.harmonics, generator=generator)  # the initial phases come first
            noise = torch.rand(1, -(-length // self.block) * self.block, self.harmonics, generator=generator)
            self._noise = noise
        return noise[:, :length]


class CausalHarmonicSource(nn.Module):
    """Upstream `SourceModuleHnNSF` with causal `SineGen2`: f0 at the audio rate -> one excitation channel."""

    def __init__(self, config: CosyVoice3Config) -> None:
        super().__init__()
        cfg = config.hift
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.upsample_scale
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.num_harmonics = cfg.nb_harmonics + 1
        self.l_linear = nn.Linear(self.num_harmonics, 1)
        self.fixed = FixedSourceNoise(source_noise_state(config), self.num_harmonics,
                                      NOISE_BLOCK_SECONDS * cfg.sampling_rate)
        self.register_buffer("harmonics", torch.arange(1, self.num_harmonics + 1, dtype=torch.float32),
                             persistent=False)

    def frame_increments(self, f0: Tensor) -> Tensor:
        """f0 [B, T] (float32) -> per-frame phase increments of the harmonics, in turns, [B, harmonics, T].

        Upstream computes them per sample and down-samples linearly by the hop; each frame's two middle samples
        (the ones that down-sampling reads) hold the frame's f0, so this is the same value per frame.
        """
        return (f0.unsqueeze(-1) * self.harmonics / self.sampling_rate).remainder(1).transpose(1, 2)

    def from_phase(self, turns: Tensor, f0_audio: Tensor, start: int) -> Tensor:
        """Cumulative phase per frame `turns` [B, harmonics, T] (float32), f0 [B, L, 1] at the audio rate, and
        the absolute index of its first sample `start` (it selects the fixed noise) -> source [B, L, 1]."""
        phase = turns * 2 * math.pi
        phase = F.interpolate(phase * self.upsample_scale, scale_factor=float(self.upsample_scale), mode="nearest")
        sines = torch.sin(phase).transpose(1, 2) * self.sine_amp
        voiced = (f0_audio > self.voiced_threshold).to(sines.dtype)
        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        noise = self.fixed.noise(start + f0_audio.size(1))[:, start:]
        sines = sines * voiced + noise_amp * noise.to(f0_audio.device)
        return torch.tanh(self.l_linear(sines))

    def forward(self, f0: Tensor) -> Tensor:
        """f0 [B, L, 1] at the audio rate (float32), from sample 0 -> source [B, L, 1]."""
        rad = (f0 * self.harmonics / self.sampling_rate) % 1  # phase increment per sample, in turns
        rad[:, 0, :] = rad[:, 0, :] + self.fixed.initial_phase.to(f0.device)
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / self.upsample_scale, mode="linear")
        return self.from_phase(torch.cumsum(rad, dim=2), f0, 0)


class CausalHiFTGenerator(HiFTStages, nn.Module):
    def __init__(self, config: CosyVoice3Config) -> None:
        super().__init__()
        cfg = config.hift
        spec_channels, stage_channels = self.set_sizes(cfg)
        self.look_right = config.conv_pre_look_right
        base = cfg.base_channels

        self.f0_predictor = CausalF0Predictor(cfg.f0_predictor.in_channels, cfg.f0_predictor.cond_channels,
                                              cfg.f0_predictor.num_class)
        self.m_source = CausalHarmonicSource(config)
        self.conv_pre = CausalConv1d(cfg.in_channels, base, self.look_right + 1, right=True)
        self.ups = nn.ModuleList(
            CausalUpsample(base // 2 ** i, stage_channels[i], k, u)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # Stage i needs the source STFT down-sampled by the product of the remaining up-sampling rates.
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            rate = math.prod(cfg.upsample_rates[i + 1:])
            self.source_downs.append(CausalConv1d(spec_channels, stage_channels[i], 1) if rate == 1
                                     else CausalDownsample(spec_channels, stage_channels[i], rate))
            self.source_resblocks.append(CausalResBlock(stage_channels[i], k, d))
        self.resblocks = nn.ModuleList(
            CausalResBlock(ch, k, d)
            for ch in stage_channels
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = CausalConv1d(stage_channels[-1], spec_channels, 7)
        self.register_buffer("stft_window", torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float(),
                             persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: CosyVoice3Config | None = None,
                        device: str | torch.device = "cpu") -> "CausalHiFTGenerator":
        """Load `<model_dir>/hift.pt` (a GAN checkpoint's `generator.` prefix is stripped)."""
        config = config or CosyVoice3Config.from_model_dir(model_dir)
        path = Path(model_dir) / "hift.pt"
        raw = load_state_dict(path, strip_prefix="generator.")
        f0_keys = {k for k in raw if k.startswith("f0_predictor.")}
        state = fold_weight_norm({k: v for k, v in raw.items() if k not in f0_keys})
        state.update(fold_weight_norm({k: raw[k] for k in f0_keys}, dtype=torch.float64))
        model = cls(config)
        check_keys(model, state, str(path))
        return model.to(device).eval()

    def upsample_f0(self, f0: Tensor) -> Tensor:
        """f0 [B, T] at the mel frame rate -> [B, T * upsample_scale, 1] float32 (nearest)."""
        f0_audio = F.interpolate(f0.float()[:, None], scale_factor=float(self.upsample_scale), mode="nearest")
        return f0_audio.transpose(1, 2)

    def source(self, f0: Tensor) -> Tensor:
        """f0 [B, T] at the mel frame rate -> excitation [B, 1, T * upsample_scale] (float32)."""
        return self.m_source(self.upsample_f0(f0)).transpose(1, 2)

    def decode(self, mel: Tensor, source: Tensor, finalize: bool = True, stage_out: dict | None = None) -> Tensor:
        """mel [B, 80, T], source [B, 1, 480 T] -> waveform [B, 480 T] (finalize) or [B, 480 (T - look_right - 1)]
        (the last look_right frames are look-ahead, and the last frame's samples are held back). `stage_out`,
        if given, receives the conv_pre and conv_post outputs."""
        spec = self.source_spectrum(source)
        if finalize:
            x = self.conv_pre(mel)
        else:
            x = self.conv_pre(mel[:, :, :-self.look_right], mel[:, :, -self.look_right:])
            spec = spec[:, :, :-(self.upsample_scale // self.hop_len) * self.look_right]
        if stage_out is not None:
            stage_out["conv_pre"] = x
        x = self.stages(x, spec)
        if stage_out is not None:
            stage_out["conv_post"] = x

        wav = self.to_wave(x)
        if not finalize:
            wav = wav[:, :-self.upsample_scale]
        return wav.clamp(-self.cfg.audio_limit, self.cfg.audio_limit)

    @torch.inference_mode()
    def inference(self, mel: Tensor, finalize: bool = True) -> tuple[Tensor, Tensor]:
        """mel [B, 80, T] -> (speech [B, 480 T], source [B, 1, 480 T]); with finalize=False the last 3 frames are
        the f0 predictor's look-ahead: speech [B, 480 (T - 8)], source [B, 1, 480 (T - 3)]."""
        source = self.source(self.f0_predictor(mel, finalize))
        return self.decode(mel if finalize else mel[:, :, :-F0_RIGHT_CONTEXT], source, finalize), source
