"""CosyVoice2's HiFT vocoder: mel [B, 80, T] -> 24 kHz waveform [B, 480 T].

HiFT is a HiFi-GAN whose generator predicts a 16-point STFT (9 magnitudes + 9 phases per 4-sample hop)
and is driven by a neural-source-filter excitation built from a predicted f0:

  mel -> F0Predictor -> f0 [B, T] (Hz) -> nearest x480 -> harmonic source [B, 1, 480 T]
  mel -> conv_pre -> 3 x (leaky_relu, ConvTranspose up, + downsampled STFT of the source, Snake resblocks)
      -> conv_post -> exp(magnitude), sin(phase) -> iSTFT -> clamp

Module and parameter names follow the official `hift.pt`, so the checkpoint loads strictly once its
weight-norm pairs are folded into plain weights (`cosyapp.backends.weights.fold_weight_norm`).

Randomness. Upstream's source draws, on every call and in this order: `rand(B, 9)` initial harmonic
phases (column 0 then zeroed), `randn(B, L, 9)` additive noise on the harmonics, `randn(B, L, 1)` for an
NSF noise branch that inference throws away. `inference(generator=...)` selects the behaviour:

- `generator=None`: zero randomness (initial phases 0, noise 0). This is the golden "patched" mode and is
  bitwise-reproducible; parity tests use it.
- a `torch.Generator`: the upstream draws, in upstream order, from that generator. Seeded with the golden
  seed it reproduces `prompt_seeded__*`; the serving path gives every request its own generator (see
  `token2wav.Token2Wav`), which is the product default because the model was trained with this noise:
  it is the only excitation in unvoiced frames (fricatives), where the harmonics are gated off.

Note that the random initial phase is dead weight upstream: it is added at sample 0 only, and the linear
1/480 down-sampling reads frame i from samples 480i+239 and 480i+240, so it never reaches the output. We
still draw it so a seeded generator stays in step with upstream.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config, HiftConfig
from cosyapp.backends.weights import check_keys, fold_weight_norm, load_state_dict


def _same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha, per channel; alpha is stored linearly (no log scale)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + 1e-9)) * torch.sin(x * alpha).pow(2)


class SnakeResBlock(nn.Module):
    """Per dilation: Snake -> dilated conv -> Snake -> conv, with a residual around each pair."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(self.conv(channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(self.conv(channels, kernel_size, 1) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    @staticmethod
    def conv(channels: int, kernel_size: int, dilation: int) -> nn.Module:
        """The block's convolution; CosyVoice3's causal block swaps in a causal one."""
        return nn.Conv1d(channels, channels, kernel_size, dilation=dilation,
                         padding=_same_padding(kernel_size, dilation))

    def forward(self, x: Tensor) -> Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """Upstream `ConvRNNF0Predictor` (no RNN despite the name): 5 x (conv k3 + ELU), linear, abs."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)  # convs at even indices, as in the checkpoint
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: Tensor) -> Tensor:
        """mel [B, 80, T] -> f0 [B, T] in Hz."""
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class HarmonicSource(nn.Module):
    """Upstream `SourceModuleHnNSF` with `SineGen2`: f0 at the audio rate -> one excitation channel.

    Harmonics 1..nb_harmonics+1 of f0 are integrated at the frame rate (phase increments linearly
    down-sampled by the hop, cumulative sum, scaled back and linearly up-sampled), gated by voicing,
    mixed with noise, then merged by Linear(9 -> 1) + tanh.
    """

    def __init__(self, cfg: HiftConfig) -> None:
        super().__init__()
        self.sampling_rate = cfg.sampling_rate
        self.upsample_scale = cfg.upsample_scale
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.num_harmonics = cfg.nb_harmonics + 1
        self.l_linear = nn.Linear(self.num_harmonics, 1)
        # Draw the harmonic noise in upstream's memory order (see forward). False draws the same distribution
        # contiguously, ~15x faster on the CPU; a seeded generator then gives other (still reproducible) noise.
        self.upstream_noise_order = True
        self.register_buffer(
            "harmonics", torch.arange(1, self.num_harmonics + 1, dtype=torch.float32), persistent=False
        )

    def forward(self, f0: Tensor, generator: torch.Generator | None) -> Tensor:
        """f0 [B, L, 1] at the audio rate -> source [B, L, 1]."""
        batch, length, _ = f0.shape
        rad = (f0 * self.harmonics / self.sampling_rate) % 1  # phase increment per sample, in turns
        if generator is not None:
            initial_phase = _draw(torch.rand, (batch, self.num_harmonics), generator, f0.device)
            initial_phase[:, 0] = 0
            rad[:, 0, :] = rad[:, 0, :] + initial_phase
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / self.upsample_scale, mode="linear")
        phase = torch.cumsum(rad, dim=2) * 2 * math.pi
        phase = F.interpolate(phase * self.upsample_scale, scale_factor=float(self.upsample_scale), mode="linear")
        sines = torch.sin(phase).transpose(1, 2) * self.sine_amp

        voiced = (f0 > self.voiced_threshold).to(sines.dtype)
        sines = sines * voiced
        if generator is not None:
            noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
            # Upstream's randn_like(sines) inherits the sines' transposed [B, harmonics, L] memory layout, and
            # torch's CPU sampler fills a non-contiguous tensor element by element (other numbers than a
            # contiguous randn): allocate the same layout so a seeded generator gives upstream's noise.
            if self.upstream_noise_order:
                noise = torch.empty((batch, self.num_harmonics, length), device=generator.device).transpose(1, 2)
                noise = noise.normal_(generator=generator)
            else:
                noise = torch.randn((batch, length, self.num_harmonics), generator=generator, device=generator.device)
            sines = sines + noise_amp * noise.to(f0.device)
            # Upstream also draws the NSF noise branch, which inference discards; keep the generator in step.
            _draw(torch.randn, (batch, length, 1), generator, f0.device)
        return torch.tanh(self.l_linear(sines))


def _draw(fn: Callable[..., Tensor], shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Draw on the generator's own device (a CPU generator reproduces upstream's CPU goldens on any device)."""
    return fn(shape, generator=generator, device=generator.device).to(device)


class HiFTStages:
    """The STFT-domain decoder both HiFT generators share: CosyVoice3's causal one differs only in its layers
    and in what it trims for streaming. Needs the generator's n_fft, hop_len, stft_window, ups, source_downs,
    source_resblocks, resblocks, num_kernels, conv_post and cfg."""

    def set_sizes(self, cfg: HiftConfig) -> tuple[int, list[int]]:
        """Keep `cfg` and the STFT sizes on the generator; returns (source spectrum channels, stage channels)."""
        self.cfg = cfg
        self.n_fft, self.hop_len = cfg.istft_n_fft, cfg.istft_hop_len
        self.upsample_scale = cfg.upsample_scale
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        spec_channels = self.n_fft + 2  # real ++ imag of n_fft // 2 + 1 bins
        return spec_channels, [cfg.base_channels // 2 ** (i + 1) for i in range(len(cfg.upsample_rates))]

    def source_spectrum(self, source: Tensor) -> Tensor:
        """source [B, 1, 480 T] -> real and imaginary STFT bins stacked [B, 18, 120 T + 1]."""
        spec = torch.view_as_real(torch.stft(source.squeeze(1), self.n_fft, self.hop_len, self.n_fft,
                                             window=self.stft_window, return_complex=True))
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def stages(self, x: Tensor, spec: Tensor) -> Tensor:
        """conv_pre output -> conv_post output: upsampling stages fused with the source spectrum."""
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == last:
                x = F.pad(x, (1, 0), mode="reflect")  # 120 T -> 120 T + 1 frames, to match the source STFT
            x = x + self.source_resblocks[i](self.source_downs[i](spec))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, unlike the stages
        return x

    def to_wave(self, x: Tensor) -> Tensor:
        """conv_post output -> waveform [B, samples] (not clamped)."""
        bins = self.n_fft // 2 + 1
        magnitude = torch.exp(x[:, :bins]).clamp(max=1e2)
        phase = torch.sin(x[:, bins:])  # upstream's quirk: the "phase" goes through a sine first
        spec_out = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec_out, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window)
        return wav


class HiFTGenerator(HiFTStages, nn.Module):
    def __init__(self, cfg: HiftConfig) -> None:
        super().__init__()
        spec_channels, stage_channels = self.set_sizes(cfg)
        base = cfg.base_channels

        self.f0_predictor = F0Predictor(cfg.f0_predictor.in_channels, cfg.f0_predictor.cond_channels,
                                        cfg.f0_predictor.num_class)
        self.m_source = HarmonicSource(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(base // 2 ** i, stage_channels[i], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # The source STFT runs at the final frame rate; stage i needs it down-sampled by the product of the
        # remaining up-sampling rates (15, 3, 1 for rates 8, 5, 3).
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (k, d) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            rate = math.prod(cfg.upsample_rates[i + 1:])
            if rate == 1:
                self.source_downs.append(nn.Conv1d(spec_channels, stage_channels[i], 1))
            else:
                self.source_downs.append(nn.Conv1d(spec_channels, stage_channels[i], rate * 2, rate, padding=rate // 2))
            self.source_resblocks.append(SnakeResBlock(stage_channels[i], k, d))
        self.resblocks = nn.ModuleList(
            SnakeResBlock(ch, k, d)
            for ch in stage_channels
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(stage_channels[-1], spec_channels, 7, padding=3)
        # scipy's get_window("hann", n, fftbins=True) in float64, cast like upstream does.
        self.register_buffer("stft_window", torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float(),
                             persistent=False)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: CosyVoice2Config,
                        device: str | torch.device = "cpu") -> "HiFTGenerator":
        """Load `<model_dir>/hift.pt` (a GAN checkpoint's `generator.` prefix is stripped)."""
        path = Path(model_dir) / "hift.pt"
        state = fold_weight_norm(load_state_dict(path, strip_prefix="generator."))
        model = cls(config.hift)
        check_keys(model, state, str(path))
        return model.to(device).eval()

    def source(self, f0: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """f0 [B, T] at the mel frame rate -> excitation [B, 1, T * upsample_scale]. `generator` may be one
        per row (a batch of streams, each drawing from its own generator as if it ran alone)."""
        if isinstance(generator, Sequence):
            return torch.cat([self.source(f0[row:row + 1], g) for row, g in enumerate(generator)])
        f0_audio = F.interpolate(f0[:, None], scale_factor=float(self.upsample_scale), mode="nearest")
        return self.m_source(f0_audio.transpose(1, 2), generator).transpose(1, 2)

    def decode(self, mel: Tensor, source: Tensor) -> Tensor:
        """mel [B, 80, T], source [B, 1, 480 T] -> waveform [B, 480 T] (clamped to +-audio_limit)."""
        x = self.stages(self.conv_pre(mel), self.source_spectrum(source))
        wav = self.to_wave(x)
        return wav.clamp(-self.cfg.audio_limit, self.cfg.audio_limit)

    @torch.inference_mode()
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | Sequence[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
        """mel [B, 80, T] -> (speech [B, 480 T], source [B, 1, 480 T]).

        `cache_source` [B, 1, S] overwrites the first S source samples: streaming passes the tail of the
        previous chunk's excitation so the harmonic phase continues across chunks. `generator`: see the
        module docstring (None = zero randomness; a sequence: one generator per row).
        """
        source = self.source(self.f0_predictor(mel), generator)
        if cache_source is not None and cache_source.shape[2] > 0:
            source[:, :, :cache_source.shape[2]] = cache_source
        return self.decode(mel, source), source
