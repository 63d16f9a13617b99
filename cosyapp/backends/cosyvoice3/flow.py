"""CosyVoice3 flow (upstream `CausalMaskedDiffWithDiT`): speech tokens (+ prompt tokens, prompt mel, speaker
vector) -> 50 Hz mel.

There is no conformer any more: token embeddings (80-d) go through CosyVoice2's PreLookaheadLayer (narrower
hidden width) and are repeated token_mel_ratio times to give `mu`; CosyVoice2's conditional flow matching
solver (fixed noise, cosine schedule, 10 Euler steps, classifier-free guidance) then integrates the DiT's
velocity. `inference` recomputes the whole prompt + target sequence, as upstream does every call;
`forward_cached` computes only a call's new frames, through per-stream DiT caches (chunk mask only).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cosyapp.backends.cosyvoice2.flow import CausalFlowMatching, load_flow_weights
from cosyapp.backends.cosyvoice2.flow_encoder import PreLookaheadLayer
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config, FlowConfig
from cosyapp.backends.cosyvoice3.estimator import DiT, DiTCache


class CosyVoice3Flow(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.input_embedding = nn.Embedding(config.vocab_size, config.input_size)
        self.spk_embed_affine_layer = nn.Linear(config.spk_embed_dim, config.output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(config.input_size, config.pre_lookahead_len,
                                                     config.pre_lookahead_channels)
        self.decoder = CausalFlowMatching(DiT(config.estimator), config.output_size, config.n_timesteps,
                                          config.inference_cfg_rate, config.t_scheduler)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: CosyVoice3Config | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "CosyVoice3Flow":
        """Build from `<model_dir>/flow.pt`; a missing file or key/shape mismatch raises ModelFileError."""
        config = config or CosyVoice3Config.from_model_dir(model_dir)
        return load_flow_weights(cls(config.flow), Path(model_dir), device, dtype)

    def encode(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
               embedding: torch.Tensor, finalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder inputs: mu [1, 80, T], spks [1, 80], cond [1, 80, T] with T = ratio * (P + N').

        N' = N when `finalize`, else N - pre_lookahead_len: the last tokens then only serve as look-ahead.
        """
        spks = self.speaker(embedding)
        x = self.input_embedding(torch.cat([prompt_token, token], dim=1).clamp(min=0))
        if finalize:
            h = self.pre_lookahead_layer(x, None)
        else:
            lookahead = self.config.pre_lookahead_len
            h = self.pre_lookahead_layer(x[:, :-lookahead], x[:, -lookahead:])
        mu = h.repeat_interleave(self.config.token_mel_ratio, dim=1).transpose(1, 2).contiguous()
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_feat.size(1)] = prompt_feat.transpose(1, 2)
        return mu, spks, cond

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool = False, finalize: bool = True) -> torch.Tensor:
        """token [1, N], prompt_token [1, P] (int), prompt_feat [1, ratio P, 80], embedding [1, 192]
        -> mel [1, 80, ratio N'] of the non-prompt frames (float32), N' as in `encode`.

        `streaming` selects the DiT's chunk mask; `finalize=False` holds back the last pre_lookahead_len tokens.
        """
        self._check_shapes(token, prompt_token, prompt_feat, embedding, finalize)
        mu, spks, cond = self.encode(token, prompt_token, prompt_feat, embedding, finalize)
        mel = self.decoder(mu, torch.ones_like(mu[:, :1]), spks, cond, streaming)
        return mel[:, :, prompt_feat.size(1):]

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """CAM++ embedding [1, 192] -> the decoder's speaker vector [1, 80]."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def new_caches(self) -> list[DiTCache]:
        """Empty caches for one stream's `forward_cached` calls: one per Euler step."""
        return [DiTCache() for _ in range(self.config.n_timesteps)]

    def prefill_length(self, prompt_tokens: int) -> int:
        """Prompt tokens whose frames can be cached before the speech tokens are known: whole chunks whose
        look-ahead tokens are prompt tokens too."""
        chunk = self.config.estimator.static_chunk_size // self.config.token_mel_ratio
        return max(0, prompt_tokens - self.config.pre_lookahead_len) // chunk * chunk

    @torch.inference_mode()
    def forward_cached(self, tokens: torch.Tensor, end: int, finalize: bool, spks: torch.Tensor,
                       prompt_feat: torch.Tensor, caches: list[DiTCache]) -> torch.Tensor:
        """Chunk-masked mel [1, 80, ratio * (end - start)] of tokens[:, start:end], start being the tokens the
        caches hold (tokens [1, n] = prompt ++ speech tokens, `spks` = `speaker(embedding)`).

        Equal to frames [ratio * start, ratio * end) of `inference(streaming=True)` on tokens[:, :end] (plus
        the 3 look-ahead tokens after it unless `finalize`), as long as every call ends on the chunk grid
        except the last: a chunk's frames attend to their own chunk and never to later frames.
        """
        ratio, lookahead = self.config.token_mel_ratio, self.config.pre_lookahead_len
        start = caches[0].length // ratio
        first = max(0, start - 2)  # conv2 of the look-ahead layer (kernel 3) needs 2 earlier positions
        x = self.input_embedding(tokens[:, first:end].clamp(min=0))
        context = None if finalize else self.input_embedding(tokens[:, end:end + lookahead].clamp(min=0))
        h = self.pre_lookahead_layer(x, context)[:, start - first:]
        mu = h.repeat_interleave(ratio, dim=1).transpose(1, 2).contiguous()
        cond = torch.zeros_like(mu)
        prompt_frames = min(prompt_feat.size(1) - ratio * start, mu.size(2))
        if prompt_frames > 0:
            cond[:, :, :prompt_frames] = prompt_feat[:, ratio * start:ratio * start + prompt_frames].transpose(1, 2)
        return self.decoder(mu, torch.ones_like(mu[:, :1]), spks, cond, streaming=True, start=ratio * start,
                            caches=caches)

    def _check_shapes(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                      embedding: torch.Tensor, finalize: bool) -> None:
        cfg = self.config
        if token.dim() != 2 or token.size(0) != 1:
            raise ValueError(f"token {tuple(token.shape)} must be [1, n]")
        if prompt_token.dim() != 2 or prompt_token.size(0) != 1:
            raise ValueError(f"prompt_token {tuple(prompt_token.shape)} must be [1, n]")
        if prompt_feat.shape != (1, cfg.token_mel_ratio * prompt_token.size(1), cfg.output_size):
            raise ValueError(f"prompt_feat {tuple(prompt_feat.shape)} must be "
                             f"[1, {cfg.token_mel_ratio} * {prompt_token.size(1)}, {cfg.output_size}]")
        if embedding.shape != (1, cfg.spk_embed_dim):
            raise ValueError(f"embedding {tuple(embedding.shape)} must be [1, {cfg.spk_embed_dim}]")
        if not finalize and token.size(1) <= cfg.pre_lookahead_len:
            raise ValueError(f"a non-final call needs more than {cfg.pre_lookahead_len} tokens, got {token.size(1)}")
