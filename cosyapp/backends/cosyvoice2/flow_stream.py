"""Incremental streaming flow for CosyVoice2: each call computes the mel of the new tokens only.

Upstream re-runs the flow on the prompt and every token so far for each streamed chunk, so a sentence
costs O(N^2). Its non-final calls use chunk masks (encoder chunk 25 tokens / 50 frames after
up-sampling, estimator chunk 50 frames, every left chunk visible, grid aligned at absolute position 0
prompt included), and its schedule makes every non-final call end on a chunk boundary. The mel of the
frames before that boundary therefore never changes, and a per-stream cache of the committed prefix
(chunk_cache.py) lets each call compute its new frames only, with the same result up to float
rounding:

- encoder: conformer keys/values (relative positions: the positional term of the new queries is taken
  against every cached key), the look-ahead conv's left context (the 3 look-ahead tokens of a non-final
  call are context only, and the real tokens that follow), the up-sampling conv's left context;
- estimator: per Euler step, every transformer block's keys/values for both CFG rows and every causal
  conv's left context; the noise of a frame is fixed by its absolute index.

A call that does not end on a chunk boundary (the final one, or another schedule) commits only up to
the last boundary and the next call recomputes the partial chunk, so any schedule gets exactly
upstream's frames; upstream's schedule just never pays for that.

The final call: upstream runs it with full attention over everything (streaming=False), which no cache
can reproduce. `exact_final=True` keeps that (one full recomputation per sentence, parity with upstream's
last chunk); `exact_final=False` finishes with chunk masks incrementally, so no call's cost grows with
the position in the sentence except attention over the cached keys (linear in it, not quadratic).

Memory (`cache_bytes_per_frame`): per mel frame the estimator keeps n_timesteps x 2 CFG rows x blocks x
(K + V) values. CosyVoice2-0.5B: 10 x 2 x 56 x 2 x 512 = 1.15 M values, 2.3 MB in float16 (4.6 MB in
float32), so 20 s of prompt + speech (1000 frames) is 2.3 GB per stream; the encoder adds under 1 %.
`max_cache_frames` (default: DEFAULT_CACHE_BUDGET_BYTES worth) bounds it: a stream that would grow past
it drops its caches and recomputes its calls like upstream from then on (exact, quadratic).

Bounded left context (`left_chunks=k`; None or -1, this class's default, is exact: upstream's
`num_decoding_left_chunks: -1`; the service defaults to k = 8): every attention layer, encoder and estimator,
lets a position see the prompt (always: it carries the voice) and its own and the k previous chunks (25
tokens, 50 frames) only, so each call's cost and the caches stop growing along the utterance. The output
equals upstream's up to the first chunk whose window starts after the end of the prompt (chunk c with (c - k)
x 50 > 2 P frames) and departs from it from there on. The caches hold the prompt and the last k chunks between
calls, plus the new frames during one (`window_cache_frames`): per stream at most cache_bytes_per_frame x (2 P
+ 50 k + 2 x the call's tokens). CosyVoice2-0.5B in float16 (2.3 MB per frame), 6 s prompt (P = 150 tokens),
100-token hops: k = 4 -> 700 frames = 1.6 GB, k = 8 -> 900 frames = 2.1 GB, however long the sentence. The
prompt's 300 frames (0.7 GB) of that are the same in every stream of a voice (each fork copies them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cosyapp.backends.cosyvoice2.chunk_cache import normalized_left_chunks
from cosyapp.backends.cosyvoice2.config import FlowConfig
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow

DEFAULT_CACHE_BUDGET_BYTES = 2 << 30  # per stream


class FlowModel(Protocol):
    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                  streaming: bool, finalize: bool) -> Tensor: ...


def cache_bytes_per_frame(cfg: FlowConfig, dtype: torch.dtype) -> int:
    """Device memory a FlowStream's caches take per mel frame (prompt frames included) for a flow in `dtype`."""
    est, enc = cfg.estimator, cfg.encoder
    blocks = est.n_blocks * (2 + est.num_mid_blocks)  # down, mid and up transformer stacks
    estimator = cfg.n_timesteps * 2 * blocks * 2 * est.num_heads * est.attention_head_dim
    # Encoder keys/values: token-rate layers cover 1/ratio of a frame each, up layers one frame.
    encoder = 2 * enc.output_size * (enc.num_blocks / cfg.token_mel_ratio + enc.num_up_blocks)
    return int((estimator + encoder) * torch.empty(0, dtype=dtype).element_size())


def window_cache_frames(cfg: FlowConfig, prompt_tokens: int, left_chunks: int, new_tokens: int) -> int:
    """The most mel frames a FlowStream with `left_chunks` keeps in its estimator caches during a call of
    `new_tokens` tokens: the prompt's, the window's (a query's own chunk is new) and the new ones."""
    return cfg.token_mel_ratio * (prompt_tokens + left_chunks * cfg.encoder.static_chunk_size + new_tokens)


class FlowStream:
    """The flow state of one sentence: `advance(new_tokens, finalize)` -> mel [1, 80, frames] of the tokens
    that became final in this call (float32), like upstream's flow call sliced at the previous offset.

    Non-final calls hold back the last pre_lookahead_len tokens as look-ahead (their mel comes with a later
    call). Calls ending on the chunk grid, as upstream's schedule (token2wav.py) makes them, compute their
    new tokens only; others also recompute their trailing partial chunk in the next call. `left_chunks`
    bounds the left context (module docstring); the final call of `exact_final` still sees everything.
    """

    def __init__(self, flow: CosyVoice2Flow, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                 exact_final: bool = True, max_cache_frames: int | None = None,
                 left_chunks: int | None = None) -> None:
        cfg = flow.config
        if cfg.estimator.static_chunk_size != cfg.token_mel_ratio * cfg.encoder.static_chunk_size:
            raise ValueError(f"estimator chunk {cfg.estimator.static_chunk_size} frames is not the encoder chunk "
                             f"{cfg.encoder.static_chunk_size} tokens x {cfg.token_mel_ratio}: chunks would not align")
        flow.check_prompt(prompt_token, prompt_feat, embedding)
        self.flow = flow
        self.chunk_size = cfg.encoder.static_chunk_size
        self.lookahead = cfg.pre_lookahead_len
        self.ratio = cfg.token_mel_ratio
        self.prompt_token, self.prompt_feat, self.embedding = prompt_token, prompt_feat, embedding
        self.prompt_len = prompt_token.size(1)
        self.tokens = prompt_token.long()  # prompt and every token so far, [1, P + N]
        self.emitted = self.prompt_len  # tokens whose mel has been returned (the prompt's is never returned)
        self.exact_final = exact_final
        self.left_chunks = normalized_left_chunks(left_chunks)
        if max_cache_frames is None:
            max_cache_frames = DEFAULT_CACHE_BUDGET_BYTES // cache_bytes_per_frame(cfg, flow.encoder_proj.weight.dtype)
        self.max_cache_frames = max_cache_frames
        self.recompute = False  # set for good once the caches would outgrow max_cache_frames
        self.finished = False
        with torch.inference_mode():
            self.spks = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        self.encoder_cache, self.estimator_caches = flow.new_caches(self.prompt_len, self.left_chunks,
                                                                    max_cache_frames)

    @property
    def committed(self) -> int:
        """Tokens (prompt included) whose state is cached."""
        return self.encoder_cache.tokens.length

    @torch.inference_mode()
    def advance(self, tokens: Tensor | Sequence[int], finalize: bool = False) -> Tensor:
        """Append `tokens` (the speech tokens since the previous call) and return the mel of the tokens now
        final: all of them when `finalize`, else all but the last pre_lookahead_len."""
        return run_together([self.prepare(tokens, finalize)])[0]

    def prepare(self, tokens: Tensor | Sequence[int], finalize: bool = False) -> "FlowCall":
        """The first half of `advance`: append the tokens and choose how the call is computed.
        `run_together` computes it, batched with other streams' calls where their `batch_key`s match."""
        if self.finished:
            raise RuntimeError("advance() after the final call")
        tokens = torch.as_tensor(tokens).to(device=self.tokens.device, dtype=torch.long).reshape(1, -1)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        end = self.tokens.size(1) - (0 if finalize else self.lookahead)
        self.finished = finalize
        if end <= self.emitted:
            path = "empty"
        elif finalize and self.exact_final:
            path = "exact"
        elif self.recompute or self.ratio * end - self.estimator_caches[0].dropped > self.max_cache_frames:
            self._drop_caches()
            self.recompute = True
            path = "recompute"
        else:
            path = "incremental"
        return FlowCall(self, end, finalize, path)

    @torch.inference_mode()
    def prefill_prompt(self) -> None:
        """Compute the prompt's complete chunks now: those whose look-ahead tokens are prompt tokens too, so
        their state is the same for every sentence of this voice. Do it once per voice, then `fork()` per
        sentence, and each sentence's first call computes from there instead of from position 0."""
        if self.tokens.size(1) != self.prompt_len or self.committed:
            raise RuntimeError("prefill_prompt() must come before the first advance()")
        boundary = (self.prompt_len - self.lookahead) // self.chunk_size * self.chunk_size
        if boundary > 0 and self.ratio * boundary <= self.max_cache_frames:
            _incremental([FlowCall(self, boundary, finalize=False, path="incremental")])

    @torch.inference_mode()
    def fork(self) -> "FlowStream":
        """An independent stream that continues from this one's state (settings included)."""
        if self.finished:
            raise RuntimeError("fork() of a finished stream")
        other = copy.copy(self)
        other.encoder_cache = self.encoder_cache.clone()
        other.estimator_caches = [cache.clone() for cache in self.estimator_caches]
        return other

    def nbytes(self) -> int:
        """Device memory held by this stream's caches."""
        return self.encoder_cache.nbytes() + sum(cache.nbytes() for cache in self.estimator_caches)

    def _recompute(self, streaming: bool, finalize: bool) -> Tensor:
        """Upstream's call: the flow over the prompt and all tokens, sliced after the frames already returned."""
        mel = self.flow.inference(self.tokens[:, self.prompt_len:], self.prompt_token, self.prompt_feat,
                                  self.embedding, streaming=streaming, finalize=finalize,
                                  left_chunks=self.left_chunks if streaming else None)
        return mel[:, :, self.ratio * (self.emitted - self.prompt_len):]

    def _drop_caches(self) -> None:
        self.encoder_cache, self.estimator_caches = self.flow.new_caches(self.prompt_len, self.left_chunks,
                                                                         self.max_cache_frames)

    def _compute_alone(self, call: "FlowCall") -> Tensor:
        if call.path == "empty":
            return self.spks.new_zeros(1, self.spks.size(1), 0, dtype=torch.float32)
        if call.path == "exact":
            return self._recompute(streaming=False, finalize=True)
        return self._recompute(streaming=True, finalize=call.finalize)

    def _complete(self, call: "FlowCall", mel: Tensor) -> Tensor:
        self.emitted = max(call.end, self.emitted)
        if call.finalize:
            self._drop_caches()
        return mel


@dataclass
class FlowCall:
    """One prepared call of a `FlowStream` (mel of its tokens up to `end`) or a `RecomputeFlowStream`."""
    stream: FlowStream | RecomputeFlowStream
    end: int
    finalize: bool
    path: str  # "empty" (nothing new), "exact" (full attention), "recompute" (caches dropped), "incremental"

    @property
    def batch_key(self) -> tuple | None:
        """Calls with equal keys are computed in one batch: incremental calls of one flow, each from its own
        caches at its own position. None: this call runs alone."""
        if self.path != "incremental":
            return None
        return (id(self.stream.flow),)


@torch.inference_mode()
def run_together(calls: Sequence[FlowCall]) -> list[Tensor]:
    """Compute prepared calls of different streams -> each one's mel [1, 80, frames], as `advance` returns it.
    Incremental calls of one flow go through it as one batch (one forward for all of them, each stream's
    caches updated as if it had run alone, whatever their positions); the others run one by one."""
    mels: dict[int, Tensor] = {}
    batches: dict[tuple, list[int]] = {}
    for index, call in enumerate(calls):
        key = call.batch_key
        if key is None:
            mels[index] = call.stream._compute_alone(call)
        else:
            batches.setdefault(key, []).append(index)
    for indices in batches.values():
        mels.update(zip(indices, _incremental([calls[index] for index in indices])))
    return [call.stream._complete(call, mels[index]) for index, call in enumerate(calls)]


def _incremental(calls: list[FlowCall]) -> list[Tensor]:
    """Mel [1, 80, frames] per call of the tokens after those its stream already emitted, from the caches;
    each stream commits up to its last chunk boundary (everything when finalizing: nothing follows)."""
    streams = [call.stream for call in calls]
    starts = [stream.committed for stream in streams]
    keeps = [call.end - start if call.finalize else call.end // stream.chunk_size * stream.chunk_size - start
             for call, stream, start in zip(calls, streams, starts)]
    tokens = [stream.tokens[:, start:call.end] for call, stream, start in zip(calls, streams, starts)]
    contexts = [None if call.finalize else stream.tokens[:, call.end:call.end + stream.lookahead]
                for call, stream in zip(calls, streams)]
    mels = streams[0].flow.forward_cached(
        tokens, contexts, torch.cat([stream.spks for stream in streams]), [stream.prompt_feat for stream in streams],
        [stream.encoder_cache for stream in streams], [stream.estimator_caches for stream in streams], keeps)
    return [mel[:, :, stream.ratio * (stream.emitted - start):]
            for mel, stream, start in zip(mels, streams, starts)]


class RecomputeFlowStream:
    """Upstream's behaviour behind the same `advance` interface: every call re-runs `flow.inference` on the
    prompt and all tokens so far (chunk masks; the final call with full attention when `exact_final`) and
    returns the frames after those already returned. Works with any `FlowModel`, e.g. test doubles;
    `left_chunks` (a flow whose `inference` takes it) windows the chunk masks as FlowStream does."""

    def __init__(self, flow: FlowModel, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                 exact_final: bool = True, left_chunks: int | None = None) -> None:
        self.flow = flow
        self.prompt_token, self.prompt_feat, self.embedding = prompt_token, prompt_feat, embedding
        self.exact_final = exact_final
        self.left_chunks = normalized_left_chunks(left_chunks)
        self.tokens = prompt_token.new_zeros(1, 0, dtype=torch.long)
        self.emitted_frames = 0
        self.finished = False

    def advance(self, tokens: Tensor | Sequence[int], finalize: bool = False) -> Tensor:
        return run_together([self.prepare(tokens, finalize)])[0]

    def prepare(self, tokens: Tensor | Sequence[int], finalize: bool = False) -> "FlowCall":
        if self.finished:
            raise RuntimeError("advance() after the final call")
        tokens = torch.as_tensor(tokens).to(device=self.tokens.device, dtype=torch.long).reshape(1, -1)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.finished = finalize
        return FlowCall(self, self.tokens.size(1), finalize, "recompute")

    def _compute_alone(self, call: "FlowCall") -> Tensor:
        streaming = not (call.finalize and self.exact_final)
        # Passed only when set, so that flows without a window option (test doubles) still fit.
        window = {"left_chunks": self.left_chunks} if streaming and self.left_chunks is not None else {}
        mel = self.flow.inference(token=self.tokens, prompt_token=self.prompt_token, prompt_feat=self.prompt_feat,
                                  embedding=self.embedding, streaming=streaming, finalize=call.finalize, **window)
        new = mel[:, :, self.emitted_frames:]
        self.emitted_frames = mel.size(2)
        return new

    def _complete(self, call: "FlowCall", mel: Tensor) -> Tensor:
        return mel


def open_flow_stream(flow: FlowModel, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                     incremental: bool = True, exact_final: bool = True, max_cache_frames: int | None = None,
                     left_chunks: int | None = None) -> FlowStream | RecomputeFlowStream:
    """The flow state for one sentence: incremental for a CosyVoice2Flow (unless `incremental=False`),
    upstream's recomputation for anything else. `left_chunks` (None or -1: all, exact) bounds the left
    context of the chunk masks (module docstring)."""
    if incremental and isinstance(flow, CosyVoice2Flow):
        return FlowStream(flow, prompt_token, prompt_feat, embedding, exact_final, max_cache_frames, left_chunks)
    return RecomputeFlowStream(flow, prompt_token, prompt_feat, embedding, exact_final, left_chunks)
