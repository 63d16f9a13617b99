"""CosyVoice2 flow: speech tokens (+ prompt tokens, prompt mel, speaker vector) -> 50 Hz mel.

Token embeddings go through the up-sampling conformer encoder and a projection to `mu` (one 80-d frame per
mel frame); conditional flow matching then integrates the estimator's velocity field from fixed noise to
mel in 10 Euler steps with classifier-free guidance. Parameter names are those of the official `flow.pt`
(upstream `CausalMaskedDiffWithXvec`). Outputs match upstream's `flow.inference` for the same flags.

`forward_cached` is the streaming flow over per-stream caches (chunk_cache.py, flow_stream.py); caches with
a `ChunkWindow` (`new_caches(..., left_chunks)`) bound every chunk's left context, a departure from
upstream (the service's default, `[cosyvoice2] flow_left_chunks`) that `inference(..., left_chunks=k)`
computes over a whole sequence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.cosyvoice2.chunk_cache import (BatchedCaches, ChunkCache, ChunkWindow, normalized_left_chunks,
                                                     pad_end)
from cosyapp.backends.cosyvoice2.config import CosyVoice2Config, FlowConfig
from cosyapp.backends.cosyvoice2.estimator import CausalConditionalDecoder
from cosyapp.backends.cosyvoice2.flow_encoder import EncoderCache, UpsampleConformerEncoder
from cosyapp.backends.weights import check_keys, load_state_dict

# Upstream draws its noise once, right after seeding torch with 0: 15000 frames = 300 s of mel at 50 Hz.
NOISE_SEED = 0
NOISE_FRAMES = 15000


def fixed_noise(n_mels: int, frames: int = NOISE_FRAMES) -> torch.Tensor:
    """The noise every flow call starts from: `torch.randn([1, n_mels, frames])` after seeding with 0.
    A private CPU generator gives the same values without touching the global RNG."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn([1, n_mels, frames], generator=generator)


class CausalFlowMatching(nn.Module):
    """Euler solver of the flow ODE with classifier-free guidance (upstream `CausalConditionalCFM`).

    The noise for frame i is always noise[:, :, i], so recomputing a longer sequence keeps earlier frames
    consistent. `estimator` is any module with the `CausalConditionalDecoder.forward` signature.
    """

    def __init__(self, estimator: nn.Module, n_mels: int, n_timesteps: int, cfg_rate: float,
                 t_scheduler: str = "cosine") -> None:
        super().__init__()
        self.estimator = estimator
        self.n_timesteps = n_timesteps
        self.cfg_rate = cfg_rate
        t_span = torch.linspace(0, 1, n_timesteps + 1)
        if t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * math.pi)
        # Buffers (not in flow.pt): built once, moved with the module, no host->device copy per call.
        self.register_buffer("t_span", t_span, persistent=False)
        self.register_buffer("noise", fixed_noise(n_mels), persistent=False)

    def forward(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                streaming: bool = False, start: int | Sequence[int] = 0,
                caches: Sequence[ChunkCache | BatchedCaches] | None = None) -> torch.Tensor:
        """mu, cond [B, 80, T]; mask [B, 1, T] or [1, 1, T] (the same for every row); spks [B, 80] -> mel
        [B, 80, T] (float32).

        `start` is the absolute index of the first frame (it selects the noise), or one per row for a batch of
        streams each at its own position; `caches` (streaming only) holds one estimator cache per Euler
        step, for frames that follow `start` cached ones.
        """
        b, _, frames = mu.shape
        if caches is not None and len(caches) != self.n_timesteps:
            raise ValueError(f"{len(caches)} estimator caches for {self.n_timesteps} Euler steps")
        if isinstance(start, int):
            self.check_frames(start + frames)
            x = self.noise[:, :, start:start + frames].to(mu.dtype).expand(b, -1, -1)
        else:  # a row's padding (which may run past the buffer) starts from zeros: nothing reads it back
            x = torch.stack([pad_end(self.noise[0, :, first:first + frames], 1, frames) for first in start])
            x = x.to(mu.dtype)
        # One estimator batch per step: rows [0, B) conditional, rows [B, 2B) with mu/spks/cond zeroed.
        mask_in = mask if mask.size(0) == 1 else torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        t_span = self.t_span.to(mu.dtype)
        # t advances by dt and the next dt is measured from that t, exactly as upstream accumulates it.
        t, dt = t_span[0], t_span[1] - t_span[0]
        for step in range(1, self.n_timesteps + 1):
            if caches is None:
                v = self.estimator(torch.cat([x, x]), mask_in, mu_in, t.expand(2 * b), spks_in, cond_in, streaming)
            else:
                v = self.estimator(torch.cat([x, x]), mask_in, mu_in, t.expand(2 * b), spks_in, cond_in, streaming,
                                   caches[step - 1])
            v_cond, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond)
            t = t + dt
            if step < self.n_timesteps:
                dt = t_span[step + 1] - t
        return x.float()

    def check_frames(self, end: int) -> None:
        """ValueError if mel frames up to `end` need more noise than the buffer holds."""
        if end > self.noise.size(2):
            raise ValueError(f"flow input up to mel frame {end} exceeds the {self.noise.size(2)}-frame noise buffer")


class CosyVoice2Flow(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.encoder = UpsampleConformerEncoder(config.encoder, config.pre_lookahead_len, config.token_mel_ratio)
        self.encoder_proj = nn.Linear(config.encoder.output_size, config.output_size)
        self.decoder = CausalFlowMatching(CausalConditionalDecoder(config.estimator), config.output_size,
                                          config.n_timesteps, config.inference_cfg_rate, config.t_scheduler)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: CosyVoice2Config | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "CosyVoice2Flow":
        """Build from `<model_dir>/flow.pt`; a missing file or key/shape mismatch raises ModelFileError."""
        config = config or CosyVoice2Config.from_model_dir(model_dir)
        return load_flow_weights(cls(config.flow), Path(model_dir), device, dtype)

    def encode(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
               embedding: torch.Tensor, streaming: bool, finalize: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder inputs: mu [1, 80, T], spks [1, 80], cond [1, 80, T] with T = 2 * (P + N').

        N' = N when `finalize`, else N - pre_lookahead_len: the last tokens then only serve as look-ahead.
        """
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        x = self.input_embedding(torch.cat([prompt_token, token], dim=1).clamp(min=0))
        if finalize:
            h = self.encoder(x, None, streaming)
        else:
            lookahead = self.config.pre_lookahead_len
            h = self.encoder(x[:, :-lookahead], x[:, -lookahead:], streaming)
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_feat.size(1)] = prompt_feat.transpose(1, 2)
        return mu, spks, cond

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool = False, finalize: bool = True,
                  left_chunks: int | None = None) -> torch.Tensor:
        """token [1, N], prompt_token [1, P] (int), prompt_feat [1, 2P, 80], embedding [1, 192]
        -> mel [1, 80, 2N'] of the non-prompt frames (float32), N' as in `encode`.

        `streaming` selects chunk-masked attention (encoder and estimator); `finalize=False` holds back the
        last pre_lookahead_len tokens as look-ahead context. `left_chunks` (streaming only; None or -1: all)
        bounds each chunk's left context to the prompt and that many chunks (see `ChunkWindow`).
        """
        self._check_shapes(token, prompt_token, prompt_feat, embedding, finalize)
        left_chunks = normalized_left_chunks(left_chunks)
        if left_chunks is not None:
            if not streaming:
                raise ValueError("left_chunks bounds the chunk masks: it needs streaming=True")
            return self._windowed_inference(token, prompt_token, prompt_feat, embedding, finalize, left_chunks)
        mu, spks, cond = self.encode(token, prompt_token, prompt_feat, embedding, streaming, finalize)
        mask = torch.ones_like(mu[:, :1])
        mel = self.decoder(mu, mask, spks, cond, streaming)
        return mel[:, :, prompt_feat.size(1):]

    def _windowed_inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                            embedding: torch.Tensor, finalize: bool, left_chunks: int) -> torch.Tensor:
        """`inference` with windowed chunk masks: one pass over everything through fresh windowed caches that
        commit nothing, so they only supply the masks (and drop nothing)."""
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        tokens = torch.cat([prompt_token, token], dim=1)
        end = tokens.size(1) - (0 if finalize else self.config.pre_lookahead_len)
        encoder_cache, estimator_caches = self.new_caches(prompt_token.size(1), left_chunks)
        [mel] = self.forward_cached([tokens[:, :end]], [None if finalize else tokens[:, end:]], spks, [prompt_feat],
                                    [encoder_cache], [estimator_caches], keeps=[0])
        return mel[:, :, prompt_feat.size(1):]

    def new_caches(self, prompt_tokens: int, left_chunks: int | None = None, max_cache_frames: int | None = None
                   ) -> tuple[EncoderCache, list[ChunkCache]]:
        """Empty caches for one stream: the encoder's and one estimator cache per Euler step (holding at most
        max_cache_frames frames). With `left_chunks` (not None), all of them bound the left context to the
        prompt and that many chunks, and drop what falls out of it."""
        cfg = self.config
        if left_chunks is None:
            return EncoderCache(cfg.token_mel_ratio), [ChunkCache(max_cache_frames) for _ in range(cfg.n_timesteps)]
        window = ChunkWindow(cfg.encoder.static_chunk_size, left_chunks, pinned=prompt_tokens)
        frame_window = window.scaled(cfg.token_mel_ratio)
        return (EncoderCache.windowed(cfg.token_mel_ratio, window),
                [ChunkCache(max_cache_frames, frame_window) for _ in range(cfg.n_timesteps)])

    def forward_cached(self, tokens: Sequence[torch.Tensor], contexts: Sequence[torch.Tensor | None],
                       spks: torch.Tensor, prompt_feats: Sequence[torch.Tensor],
                       encoder_caches: Sequence[EncoderCache], estimator_caches: Sequence[Sequence[ChunkCache]],
                       keeps: Sequence[int]) -> list[torch.Tensor]:
        """Chunk-masked mel [1, 80, ratio * T_i] of each stream's tokens [1, T_i] that follow the tokens held in
        its caches (`new_caches`); contexts[i] holds the look-ahead tokens after them (None at the end of
        speech), `spks` the projected speaker vectors [n, 80]. Commits the first keeps[i] tokens of each.

        Several streams go through as one batch whatever their positions and lengths: each row holds its
        tokens, then its look-ahead tokens, then padding (chunk_cache.py `BatchedCaches`)."""
        ratio, steps = self.config.token_mel_ratio, len(estimator_caches[0])
        news = [piece.size(1) for piece in tokens]
        starts = [cache.tokens.length for cache in encoder_caches]
        for start, new in zip(starts, news):
            self.decoder.check_frames(ratio * (start + new))
        for encoder_cache, step_caches, new, keep in zip(encoder_caches, estimator_caches, news, keeps):
            encoder_cache.begin(new, keep)
            for cache in step_caches:
                cache.begin(ratio * new, ratio * keep)
        lengths = None
        if len(tokens) == 1:
            x = self.input_embedding(tokens[0].clamp(min=0))
            context = None if contexts[0] is None else self.input_embedding(contexts[0].clamp(min=0))
            encoder_cache, caches, first_frames = encoder_caches[0], estimator_caches[0], ratio * starts[0]
        else:
            rows = [piece[0] if after is None else torch.cat([piece[0], after[0]])
                    for piece, after in zip(tokens, contexts)]
            width = max(row.size(0) for row in rows)
            x = self.input_embedding(torch.stack([pad_end(row, 0, width) for row in rows]).clamp(min=0))
            lengths = torch.tensor([row.size(0) for row in rows], device=x.device)
            context = None
            encoder_cache = EncoderCache.batched(list(encoder_caches), width)
            caches = [BatchedCaches([step_caches[step] for step_caches in estimator_caches], groups=2,
                                    queries=ratio * width) for step in range(steps)]
            first_frames = [ratio * start for start in starts]
        h = self.encoder(x, context, streaming=True, cache=encoder_cache, lengths=lengths)
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()

        cond = torch.zeros_like(mu)
        for row, (start, prompt_feat) in enumerate(zip(starts, prompt_feats)):
            first_frame = ratio * start
            prompt_frames = min(prompt_feat.size(1) - first_frame, ratio * news[row])
            if prompt_frames > 0:
                cond[row, :, :prompt_frames] = prompt_feat[0, first_frame:first_frame + prompt_frames].transpose(0, 1)
        # No padding mask: one all-ones frame mask for every row (padding only ever feeds padding).
        mel = self.decoder(mu, torch.ones_like(mu[:1, :1]), spks, cond, streaming=True, start=first_frames,
                           caches=caches)
        for encoder_cache, step_caches in zip(encoder_caches, estimator_caches):
            encoder_cache.commit()
            for cache in step_caches:
                cache.commit()
        return [mel[row:row + 1, :, :ratio * new] for row, new in enumerate(news)]

    def _check_shapes(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                      embedding: torch.Tensor, finalize: bool) -> None:
        cfg = self.config
        if token.dim() != 2 or token.size(0) != 1:
            raise ValueError(f"token {tuple(token.shape)} must be [1, n]")
        self.check_prompt(prompt_token, prompt_feat, embedding)
        if not finalize and token.size(1) <= cfg.pre_lookahead_len:
            raise ValueError(f"a non-final call needs more than {cfg.pre_lookahead_len} tokens, got {token.size(1)}")

    def check_prompt(self, prompt_token: torch.Tensor, prompt_feat: torch.Tensor, embedding: torch.Tensor) -> None:
        """ValueError unless prompt_token is [1, P], prompt_feat [1, 2P, 80] and embedding [1, 192]."""
        cfg = self.config
        if prompt_token.dim() != 2 or prompt_token.size(0) != 1:
            raise ValueError(f"prompt_token {tuple(prompt_token.shape)} must be [1, n]")
        if prompt_feat.shape != (1, cfg.token_mel_ratio * prompt_token.size(1), cfg.output_size):
            raise ValueError(f"prompt_feat {tuple(prompt_feat.shape)} must be "
                             f"[1, {cfg.token_mel_ratio} * {prompt_token.size(1)}, {cfg.output_size}]")
        if embedding.shape != (1, cfg.spk_embed_dim):
            raise ValueError(f"embedding {tuple(embedding.shape)} must be [1, {cfg.spk_embed_dim}]")


def load_flow_weights(model: nn.Module, model_dir: Path, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """`<model_dir>/flow.pt` loaded strictly into `model` (ModelFileError naming the file), on `device` in `dtype`."""
    path = model_dir / "flow.pt"
    # Big tensors in flow.pt can be strided views into one shared storage: give each its own memory.
    state = {key: value.contiguous() for key, value in load_state_dict(path).items()}
    check_keys(model, state, str(path))
    return model.to(device=device, dtype=dtype).eval()
