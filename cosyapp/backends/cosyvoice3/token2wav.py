"""Speech tokens -> 24 kHz audio for CosyVoice3: upstream's streaming schedule (`CosyVoice3Model.tts` and
`token2wav`) with its state held per stream.

The schedule is CosyVoice2's (first hop 25 + pad tokens so that prompt + hop ends on the 25-token chunk grid,
then hops doubling up to 100; a chunk needs hop + 3 look-ahead tokens; `finish()` vocodes the rest with full
attention). What differs is token2wav: upstream re-runs the flow on ALL tokens so far (chunk-masked for
non-final calls), appends the mel frames of the new tokens to the mel of the earlier calls, and re-vocodes the
whole accumulated mel with the causal HiFT, emitting the samples past what it emitted before (no cross-fade).
Its cost per chunk grows with the utterance; `Token2Wav(exact=True)` computes exactly that.

`exact=False` (the service's default) keeps each chunk's cost bounded by what the chunk adds:
- flow computes only the new tokens' frames, through per-stream DiT caches (`CosyVoice3Flow.forward_cached`)
  that start from the voice's prefilled prompt chunks. Earlier chunks never attend to later frames under the
  chunk mask, so the non-final chunks' mels are upstream's; the final call also uses the chunk mask
  (upstream switches to full attention there). With `left_chunks` = k a frame sees the prompt and the last k
  chunks before its own only (an approximation, as CosyVoice2's `flow_left_chunks`), so a chunk's flow cost
  stops growing along the utterance; None is exact.
- HiFT re-vocodes only the last frames: the new ones plus HIFT_CONTEXT_FRAMES before them, more than the
  causal generator's receptive field. Its f0 (final once 3 frames of look-ahead exist) and the cumulative
  source phase (summed in float64 like torch's float32 cumsum on the CPU) are carried from call to call, and
  the fixed source noise is read at absolute sample positions, so the samples match the whole re-run.
Non-streaming requests make upstream's single full-attention call either way.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from cosyapp.backends.cosyvoice2.chunk_cache import ChunkWindow, normalized_left_chunks
from cosyapp.backends.cosyvoice2.token2wav import MAX_HOP_CHUNKS, HopSchedule
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.cosyvoice3.estimator import DiTCache
from cosyapp.backends.cosyvoice3.flow import CosyVoice3Flow
from cosyapp.backends.cosyvoice3.hift import F0_RIGHT_CONTEXT, CausalHiFTGenerator
from cosyapp.engine.stats import StageTimes, timed

# Mel frames re-vocoded before a bounded chunk's first new frame: above the causal HiFT generator's receptive
# field (about 22 frames for the release's kernels and dilations) so that the new samples are the full re-run's.
HIFT_CONTEXT_FRAMES = 32
F0_CONTEXT_FRAMES = 8  # the f0 predictor's causal convs (4 x kernel 3) see 8 frames back
# Voices whose prompt flow caches are kept (most recent first): a bounded stream starts from its voice's,
# computed on the voice's first request, so its first chunk runs flow on little more than the first hop.
PREFILLED_VOICES = 4


class Token2Wav:
    """Flow + causal HiFT behind upstream's chunk schedule; shared by all requests, holds no request state."""

    def __init__(self, flow: CosyVoice3Flow, hift: CausalHiFTGenerator, config: CosyVoice3Config,
                 exact: bool = True, left_chunks: int | None = None) -> None:
        self.exact = exact
        # Bounded streams' flow left context in chunks besides the prompt (None: every earlier chunk).
        self.left_chunks = normalized_left_chunks(left_chunks)
        self.config = config
        self.flow = flow
        self.hift = hift
        self.chunk_size = config.chunk_size
        self.max_hop = MAX_HOP_CHUNKS * config.chunk_size
        self.pre_lookahead = config.flow.pre_lookahead_len
        self.token_mel_ratio = config.token_mel_ratio
        # id(prompt_token) -> (weak reference to it, its prefilled flow caches), least recent first.
        self._prefilled: OrderedDict[int, tuple[weakref.ref, list[DiTCache]]] = OrderedDict()

    def new_stream(self, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                   stream: bool = True) -> "Token2WavStream":
        """Start one request: prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192], on the model
        device. `stream=False`: `push` only collects tokens and `finish` makes one call over all of them."""
        return Token2WavStream(self, prompt_token, prompt_feat, embedding, stream)

    def prompt_caches(self, prompt_token: Tensor, prompt_feat: Tensor, spks: Tensor) -> list[DiTCache]:
        """Flow caches holding the prompt's complete chunks (`CosyVoice3Flow.prefill_length`), forked from the
        voice's, which are computed on its first request; windowed by `left_chunks` with the prompt pinned."""
        entry = self._prefilled.get(id(prompt_token))
        if entry is not None and entry[0]() is prompt_token:
            self._prefilled.move_to_end(id(prompt_token))
            caches = entry[1]
        else:
            caches = self.flow.new_caches()
            end = self.flow.prefill_length(prompt_token.shape[1])
            if end:
                self.flow.forward_cached(prompt_token, end, False, spks, prompt_feat, caches)
            self._prefilled[id(prompt_token)] = (weakref.ref(prompt_token), caches)
            while len(self._prefilled) > PREFILLED_VOICES:
                self._prefilled.popitem(last=False)
        window = None if self.left_chunks is None else ChunkWindow(
            self.config.flow.estimator.static_chunk_size, self.left_chunks, prompt_feat.size(1))
        return [cache.fork(window) for cache in caches]

    def prepare_group(self, sessions: Sequence["Token2WavStream"]) -> list["ChunkCall | None"]:
        """The call of each session's next chunk: its next streaming chunk when ready, else its last (every token
        in; None without tokens). The sessions' schedules move on; `compute_group` computes the calls."""
        return [s.prepare_chunk() if s.chunk_ready() else s.prepare_final() for s in sessions]

    def compute_group(self, sessions: Sequence["Token2WavStream"], calls: Sequence["ChunkCall | None"]) -> list[Tensor]:
        """The chunks of `prepare_group`'s calls, one session at a time."""
        return [torch.zeros(0, device=s.device) if call is None else s.vocode(call) for s, call in zip(sessions, calls)]

    def full(self, tokens: Sequence[int] | Tensor, prompt_token: Tensor, prompt_feat: Tensor,
             embedding: Tensor) -> Tensor:
        """Non-streaming synthesis of all tokens at once -> waveform [n]."""
        session = self.new_stream(prompt_token, prompt_feat, embedding, stream=False)
        session.push(tokens)
        return session.finish()


class ChunkCall(NamedTuple):
    """One chunk's flow and vocoder call: tokens[:num_tokens], the last call or not, the offset it starts at."""
    num_tokens: int
    finalize: bool
    offset: int


class Token2WavStream:
    """One request's state: tokens so far, hop schedule, the accumulated mel and the samples emitted."""

    def __init__(self, owner: Token2Wav, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                 stream: bool) -> None:
        self.owner = owner
        self.prompt_token, self.prompt_feat, self.embedding = prompt_token, prompt_feat, embedding
        self.stream = stream
        self.bounded = stream and not owner.exact
        self.device = prompt_token.device
        self.tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self.schedule = HopSchedule(owner.chunk_size, owner.max_hop, owner.pre_lookahead, prompt_token.shape[1])
        self.mel: Tensor | None = None  # [1, 80, frames] of every call so far
        self.speech_offset = 0  # samples emitted
        if self.bounded:
            with torch.inference_mode():
                self.spks = owner.flow.speaker(embedding)
            self.caches = owner.prompt_caches(prompt_token, prompt_feat, self.spks)
            self.f0 = torch.zeros(1, 0, dtype=torch.float64, device=self.device)  # final f0 per frame
            self.turns = torch.zeros(1, owner.hift.m_source.num_harmonics, 0, dtype=torch.float64,
                                     device=self.device)  # cumulative source phase per frame
        self.finished = False
        self.stats: StageTimes | None = None  # the request's, to time each chunk's flow and vocoder calls
        # Each call's token_len, token_offset, finalize and speech_offset_before (upstream's names), for inspection.
        self.calls: list[dict] = []

    def tokens_short(self) -> int:
        return self.schedule.tokens_short(self.tokens.numel())

    def add(self, tokens: Sequence[int] | Tensor) -> None:
        """Add speech tokens; nothing is computed (`chunk_ready`, `next_chunk`)."""
        if self.finished:
            raise RuntimeError("add() after finish()")
        tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device).reshape(-1)
        self.tokens = torch.cat([self.tokens, tokens])

    def chunk_ready(self) -> bool:
        """Whether the tokens of the next streaming chunk are all there."""
        return self.stream and self.tokens_short() <= 0

    def chunk_key(self) -> None:
        """Chunks of CosyVoice3 streams are computed one stream at a time."""
        return None

    def next_chunk(self) -> Tensor:
        """The next streaming chunk (`chunk_ready` must hold), 1-D float32."""
        return self.vocode(self.prepare_chunk())

    def prepare_chunk(self) -> ChunkCall:
        """The call of the next streaming chunk (`chunk_ready` must hold); the schedule moves on."""
        start, end = self.schedule.take()
        return ChunkCall(end, False, start)

    def push(self, tokens: Sequence[int] | Tensor) -> list[Tensor]:
        """Add speech tokens; returns the chunks (1-D float32 tensors) that became ready, maybe none."""
        self.add(tokens)
        chunks: list[Tensor] = []
        while self.chunk_ready():
            chunks.append(self.next_chunk())
        return chunks

    def finish(self) -> Tensor:
        """Vocode every remaining token (full attention; chunk mask on the bounded path) -> the last chunk, 1-D
        float32."""
        call = self.prepare_final()
        return torch.zeros(0, device=self.device) if call is None else self.vocode(call)

    def prepare_final(self) -> ChunkCall | None:
        """The call of the last chunk (every token, full attention); None without tokens."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        return ChunkCall(self.tokens.numel(), True, self.schedule.offset) if self.tokens.numel() else None

    @torch.inference_mode()
    def vocode(self, call: ChunkCall) -> Tensor:
        """Upstream `CosyVoice3Model.token2wav` on tokens[:call.num_tokens] (streaming mask unless finalize); the
        next chunk of samples, 1-D. Reads only tokens the call covers, so tokens may be added meanwhile."""
        num_tokens, finalize = call.num_tokens, call.finalize
        self.calls.append({"token_len": num_tokens, "token_offset": call.offset, "finalize": finalize,
                           "speech_offset_before": self.speech_offset})
        with timed(self.stats, "flow_chunk"):
            mel = self._new_mel(num_tokens, finalize, call.offset)
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], dim=2)
        with timed(self.stats, "vocoder_chunk"):
            if self.bounded:
                speech = self._vocode_window(finalize)
            else:
                speech = self.owner.hift.inference(self.mel, finalize=finalize)[0][0, self.speech_offset:]
        self.speech_offset += speech.numel()
        return speech

    def _new_mel(self, num_tokens: int, finalize: bool, offset: int) -> Tensor:
        """The mel frames of tokens [offset, num_tokens - look-ahead) (all of them when finalize)."""
        owner, ratio = self.owner, self.owner.token_mel_ratio
        if not self.bounded:
            mel = owner.flow.inference(self.tokens[None, :num_tokens], self.prompt_token, self.prompt_feat,
                                       self.embedding, streaming=not finalize, finalize=finalize)
            return mel[:, :, ratio * offset:]
        prompt_len = self.prompt_token.shape[1]
        end = prompt_len + num_tokens - (0 if finalize else owner.pre_lookahead)
        tokens = torch.cat([self.prompt_token, self.tokens[None]], dim=1)
        prompt_left = max(0, prompt_len - self.caches[0].length // ratio)  # prompt tokens not yet in the caches
        mel = owner.flow.forward_cached(tokens, end, finalize, self.spks, self.prompt_feat, self.caches)
        return mel[:, :, ratio * prompt_left:]

    def _vocode_window(self, finalize: bool) -> Tensor:
        """The samples past speech_offset of HiFT on the whole mel, from its last frames only."""
        hift, hop = self.owner.hift, self.owner.hift.upsample_scale
        frames = self.mel.size(2)
        f0_end = frames if finalize else frames - F0_RIGHT_CONTEXT
        done = self.f0.size(1)
        first = max(0, done - F0_CONTEXT_FRAMES)
        f0 = hift.f0_predictor(self.mel[:, :, first:], finalize)[:, done - first:f0_end - first]
        increments = hift.m_source.frame_increments(f0.float()).double()
        carry = self.turns[:, :, -1:] if done else torch.zeros_like(increments[:, :, :1])
        self.f0 = torch.cat([self.f0, f0], dim=1)
        self.turns = torch.cat([self.turns, carry + increments.cumsum(dim=2)], dim=2)

        start = max(0, self.speech_offset // hop - HIFT_CONTEXT_FRAMES)
        f0_audio = hift.upsample_f0(self.f0[:, start:f0_end])
        source = hift.m_source.from_phase(self.turns[:, :, start:f0_end].float(), f0_audio, start * hop)
        speech = hift.decode(self.mel[:, :, start:f0_end], source.transpose(1, 2), finalize)
        return speech[0, self.speech_offset - start * hop:]
