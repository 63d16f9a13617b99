"""Speech tokens -> 24 kHz audio for CosyVoice2: upstream's streaming schedule (`CosyVoice2Model.tts` and
`token2wav`) with all of its state held per stream.

Schedule (P prompt tokens, chunk 25, look-ahead 3):
- the first hop is 25 + pad tokens, pad = ceil(P / 25) * 25 - P, so that prompt + first hop ends on the
  25-token chunk grid the flow was trained with; every later hop doubles, up to 4 x 25 = 100;
- a chunk is ready once len(tokens) - offset >= hop + 3: the flow runs on tokens[:offset + hop + 3] with
  streaming=True, finalize=False (the last 3 tokens are look-ahead context only);
- `finish()` runs the flow once more on all tokens with finalize=True and streaming=False (upstream does
  not forward the stream flag on that call, so the last chunk sees full attention).

The stream's flow state (flow_stream.py) returns the mel of the new tokens only, frames [2 * offset:] of
upstream's call: by default incrementally from per-stream caches (the final call still recomputes with
full attention unless `exact_final=False`), or by re-running the flow like upstream. HiFT vocodes them
prefixed by the last 8 mel frames of the previous call, with the previous excitation tail (3840 samples)
written over the start of the source so the harmonic phase runs on; the first 3840 output samples are
cross-faded with the 3840 samples the previous call withheld (Hamming window of 7680, in float64 like
upstream's numpy window), and every non-final call withholds its own last 3840 samples.

Upstream keeps `token_hop_len` on the model object and never resets it, so its second streaming request
starts with a hop of 100. Here the hop lives in the stream, so every request gets the same schedule.

Concurrent streams: `vocode_together` computes the chunks of streams with equal `chunk_key`s as one flow batch,
and their vocoder calls in one HiFT batch per mel length, each stream's result being what it gets alone up to
float rounding. With `batch_positions` the key lets incremental streams batch wherever they are in their
schedules (rows padded and masked, flow_stream.py); without it only streams at the same point of their
schedules, whose rows need no padding, share a key. Which streams go together is the engine's choice
(cosyvoice2/runner.py, engine/scheduler.py).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.flow_stream import (FlowCall, FlowModel, FlowStream, RecomputeFlowStream,
                                                     open_flow_stream, run_together)
from cosyapp.engine.stats import StageTimes, timed_each

MEL_CACHE_FRAMES = 8  # mel frames re-vocoded at the start of every chunk after the first
MAX_HOP_CHUNKS = 4  # the hop grows up to 4 x chunk_size tokens
HOP_GROWTH = 2
# Voices whose prompt flow state is kept prefilled (flow_stream.FlowStream.prefill_prompt), most recent first.
# Each holds the caches of its prompt's complete chunks: CosyVoice2-0.5B in float32 keeps 4.6 MB per mel
# frame, about 1 GB for a 5 s prompt; a service mostly serves its default voice and a few others.
PREFILLED_VOICES = 4


class Vocoder(Protocol):
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...


def prompt_token_pad(prompt_len: int, chunk_size: int) -> int:
    """Tokens added to the first hop so that prompt + first hop is a multiple of the chunk size."""
    return -prompt_len % chunk_size


class HopSchedule:
    """Where one sentence's stream is in upstream's chunk schedule (module docstring): the first hop is chunk_size
    + pad tokens, every later one doubles up to max_hop, and a chunk also needs `lookahead` tokens after it.
    CosyVoice2 and CosyVoice3 share it."""

    def __init__(self, chunk_size: int, max_hop: int, lookahead: int, prompt_tokens: int) -> None:
        self.max_hop = max_hop
        self.lookahead = lookahead
        self.first_hop_pad = prompt_token_pad(prompt_tokens, chunk_size)
        self.hop = chunk_size
        self.offset = 0  # tokens whose chunks have been taken

    def next_hop(self) -> int:
        return self.hop + self.first_hop_pad if self.offset == 0 else self.hop

    def tokens_short(self, tokens: int) -> int:
        """Tokens still missing, with `tokens` made so far, before the next chunk can be computed (<= 0: it can)."""
        return self.offset + self.next_hop() + self.lookahead - tokens

    def take(self) -> tuple[int, int]:
        """The next chunk -> (its first token, the end of the tokens its call reads: look-ahead included); the
        schedule moves on."""
        start, hop = self.offset, self.next_hop()
        self.offset += hop
        self.hop = min(self.max_hop, self.hop * HOP_GROWTH)
        return start, start + hop + self.lookahead


class Token2Wav:
    """Flow + HiFT behind upstream's chunk schedule. Shared by all requests, so it holds no request state
    (only a per-device copy of the fade window); each `Token2WavStream` holds its own.

    `random_source=True` (the product default) gives each stream its own generator for HiFT's source
    noise, seeded from the request seed when there is one; `random_source=False` turns the noise off
    (upstream's output with its randomness patched out, as in the goldens).
    `incremental_flow` and `exact_final` choose the flow path, `flow_left_chunks` its left context (None:
    all, exact; see flow_stream.py). Incremental streams of a voice start from its prompt's prefilled flow
    state, computed once. `batch_positions`: streams batch wherever they are in their schedules (`chunk_key`).
    """

    def __init__(self, flow: FlowModel, hift: Vocoder, config: CosyVoice2Config, random_source: bool = True,
                 incremental_flow: bool = True, exact_final: bool = True, flow_left_chunks: int | None = None,
                 batch_positions: bool = False) -> None:
        self.flow = flow
        self.hift = hift
        self.chunk_size = config.chunk_size
        self.max_hop = MAX_HOP_CHUNKS * config.chunk_size
        self.pre_lookahead = config.flow.pre_lookahead_len
        self.source_cache_len = MEL_CACHE_FRAMES * config.hift.upsample_scale
        self.random_source = random_source
        self.incremental_flow = incremental_flow
        self.exact_final = exact_final
        self.flow_left_chunks = flow_left_chunks
        self.batch_positions = batch_positions
        self._windows: dict[torch.device, Tensor] = {}
        # id(prompt_token) -> (weak reference to it, its voice's prefilled flow state), least recent first.
        self._prefilled: OrderedDict[int, tuple[weakref.ref, FlowStream]] = OrderedDict()

    def fade_window(self, device: torch.device) -> Tensor:
        """np.hamming(2 * 3840) in float64: fade-in half then fade-out half."""
        if device not in self._windows:
            self._windows[device] = torch.from_numpy(np.hamming(2 * self.source_cache_len)).to(device)
        return self._windows[device]

    def new_stream(self, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor, stream: bool = True,
                   seed: int | None = None) -> "Token2WavStream":
        """Start one request: prompt_token [1, P], prompt_feat [1, 2P, 80], embedding [1, 192], all on the
        model device. `stream=False` gives upstream's non-streaming path: `push` only collects tokens and
        `finish` makes one call over all of them."""
        generator = None
        if self.random_source:
            generator = torch.Generator(device=prompt_token.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        return Token2WavStream(self, prompt_token, prompt_feat, embedding, stream, generator)

    def open_flow_stream(self, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                         stream: bool) -> FlowStream | RecomputeFlowStream:
        """One request's flow state. A streaming incremental one is forked from the voice's prefilled state
        (computed on the voice's first request, kept for the PREFILLED_VOICES most recent voices)."""
        if not (stream and self.incremental_flow and isinstance(self.flow, CosyVoice2Flow)):
            # A non-streaming request is upstream's single full-attention call.
            return open_flow_stream(self.flow, prompt_token, prompt_feat, embedding, incremental=self.incremental_flow,
                                    exact_final=self.exact_final or not stream, left_chunks=self.flow_left_chunks)
        entry = self._prefilled.get(id(prompt_token))
        if entry is not None and entry[0]() is prompt_token:
            self._prefilled.move_to_end(id(prompt_token))
            prefilled = entry[1]
        else:
            prefilled = FlowStream(self.flow, prompt_token, prompt_feat, embedding, self.exact_final,
                                   left_chunks=self.flow_left_chunks)
            prefilled.prefill_prompt()
            self._prefilled[id(prompt_token)] = (weakref.ref(prompt_token), prefilled)
            while len(self._prefilled) > PREFILLED_VOICES:
                self._prefilled.popitem(last=False)
        return prefilled.fork()

    def vocode_group(self, sessions: Sequence["Token2WavStream"]) -> list[Tensor]:
        """The next chunk of each session: its next streaming chunk when ready, else its last (every token in).
        Sessions of one `chunk_key` are computed as one batch."""
        return self.compute_group(sessions, self.prepare_group(sessions))

    def prepare_group(self, sessions: Sequence["Token2WavStream"]) -> list[FlowCall | None]:
        """The flow call of each session's next chunk (None: a last chunk without tokens); the sessions' schedules
        move on. What `compute_group` then does touches only the sessions' flow and vocoder caches."""
        return [s.prepare_chunk() if s.chunk_ready() else s.prepare_final() for s in sessions]

    def compute_group(self, sessions: Sequence["Token2WavStream"], calls: Sequence[FlowCall | None]) -> list[Tensor]:
        """The chunks of `prepare_group`'s calls; sessions of one `chunk_key` as one batch."""
        computed = [i for i, call in enumerate(calls) if call is not None]
        chunks = [torch.zeros(0, device=s.device) for s in sessions]
        if computed:
            made = vocode_together([sessions[i] for i in computed], [calls[i] for i in computed])
            for i, chunk in zip(computed, made):
                chunks[i] = chunk
        return chunks

    def full(self, tokens: Sequence[int] | Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
             seed: int | None = None) -> Tensor:
        """Non-streaming synthesis of all tokens at once -> waveform [n] on the model device."""
        session = self.new_stream(prompt_token, prompt_feat, embedding, stream=False, seed=seed)
        session.push(tokens)
        return session.finish()


class Token2WavStream:
    """The per-request state of `Token2Wav`: tokens so far, hop schedule, HiFT cache, noise generator."""

    def __init__(self, owner: Token2Wav, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                 stream: bool, generator: torch.Generator | None) -> None:
        self.owner = owner
        self.prompt_token = prompt_token
        self.prompt_feat = prompt_feat
        self.embedding = embedding
        self.stream = stream
        self.flow_stream = owner.open_flow_stream(prompt_token, prompt_feat, embedding, stream)
        self.flow_tokens = 0  # tokens handed to flow_stream
        self.generator = generator
        self.device = prompt_token.device
        self.token_pieces: list[Tensor] = []
        self.num_tokens = 0
        self.schedule = HopSchedule(owner.chunk_size, owner.max_hop, owner.pre_lookahead, prompt_token.shape[1])
        self.cache: tuple[Tensor, Tensor, Tensor] | None = None  # (mel [1,80,8], source [1,1,S], speech [1,S])
        self.finished = False  # finish() was called
        self.stats: StageTimes | None = None  # benchmarks: per-chunk flow and vocoder times

    def tokens_short(self) -> int:
        """Tokens still missing before the next chunk can be computed (<= 0: it can)."""
        return self.schedule.tokens_short(self.num_tokens)

    def add(self, tokens: Sequence[int] | Tensor) -> None:
        """Add speech tokens; nothing is computed (`chunk_ready`, `prepare_chunk`)."""
        if self.finished:
            raise RuntimeError("add() after finish()")
        tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device).reshape(-1)
        if tokens.numel():
            self.token_pieces.append(tokens)
            self.num_tokens += tokens.numel()

    def chunk_ready(self) -> bool:
        """Whether the tokens of the next streaming chunk are all there."""
        return self.stream and self.tokens_short() <= 0

    def chunk_key(self) -> tuple | None:
        """Streams whose next chunks have equal keys are computed as one batch (`vocode_together`). With the
        owner's `batch_positions`, incremental streams batch wherever they are; else only streams at the same
        point of their schedules with caches in the same state and calls of one length. Read when the stream's
        audio is ready: its next chunk, or its last one. None: the chunk goes alone (a flow that recomputes, or a
        last chunk with full attention)."""
        flow = self.flow_stream
        if not isinstance(flow, FlowStream) or flow.recompute or (flow.exact_final and not self.chunk_ready()):
            return None
        if self.owner.batch_positions:
            return (id(self.owner), self.generator is None)
        # The next call: a streaming chunk of next_hop tokens, or (the LM is done) the last one, every token left.
        offset = self.schedule.offset
        call = ("chunk", self.schedule.next_hop()) if self.chunk_ready() else ("last", self.num_tokens - offset)
        return (id(self.owner), flow.prompt_len, flow.committed, flow.emitted, flow.estimator_caches[0].dropped,
                flow.encoder_cache.tokens.dropped, offset, call, self.cache is None, self.generator is None)

    def prepare_chunk(self) -> FlowCall:
        """The flow call of the next streaming chunk (`chunk_ready` must hold); the schedule moves on."""
        return self._prepare(self.schedule.take()[1], finalize=False)

    def prepare_final(self) -> FlowCall | None:
        """The flow call of the last chunk (every remaining token, full attention); None without tokens."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        return self._prepare(self.num_tokens, finalize=True) if self.num_tokens else None

    def _prepare(self, num_tokens: int, finalize: bool) -> FlowCall:
        call = self.flow_stream.prepare(self.all_tokens()[self.flow_tokens:num_tokens], finalize)
        self.flow_tokens = num_tokens
        return call

    def push(self, tokens: Sequence[int] | Tensor) -> list[Tensor]:
        """Add speech tokens; returns the chunks (1-D float32 tensors) that became ready, maybe none."""
        self.add(tokens)
        chunks: list[Tensor] = []
        while self.chunk_ready():
            chunks.extend(vocode_together([self], [self.prepare_chunk()]))
        return chunks

    def finish(self) -> Tensor:
        """Vocode every remaining token (full attention) -> the last chunk, 1-D float32."""
        call = self.prepare_final()
        if call is None:
            return torch.zeros(0, device=self.device)
        return vocode_together([self], [call])[0]

    def all_tokens(self) -> Tensor:
        if len(self.token_pieces) > 1:
            self.token_pieces = [torch.cat(self.token_pieces)]
        return self.token_pieces[0]

    def vocoder_input(self, mel: Tensor) -> tuple[Tensor, Tensor | None]:
        """The new mel prefixed by the previous call's last frames, and the excitation tail to continue."""
        if self.cache is None:
            return mel, None
        cache_mel, cache_source, _ = self.cache
        return torch.cat([cache_mel, mel], dim=2), cache_source

    def emit(self, mel: Tensor, speech: Tensor, source: Tensor, finalize: bool) -> Tensor:
        """Cross-fade the vocoded chunk with the withheld tail, keep what the next call needs -> the chunk."""
        if self.cache is not None:
            speech = self.cross_fade(speech, self.cache[2])
        if finalize:
            self.cache = None
            return speech[0]
        tail = self.owner.source_cache_len
        self.cache = (mel[:, :, -MEL_CACHE_FRAMES:], source[:, :, -tail:], speech[:, -tail:])
        return speech[0, :-tail]

    def cross_fade(self, speech: Tensor, previous_tail: Tensor) -> Tensor:
        """Fade the previous chunk's withheld tail out and this chunk's head in (float64 math, cast back)."""
        window = self.owner.fade_window(speech.device)
        n = previous_tail.shape[-1]
        head = speech[:, :n].double() * window[:n] + previous_tail.double() * window[n:]
        return torch.cat([head.to(speech.dtype), speech[:, n:]], dim=1)


def vocode_together(streams: Sequence[Token2WavStream], calls: Sequence[FlowCall]) -> list[Tensor]:
    """The chunks of streams (one stream, or streams of one `chunk_key`), each with its prepared flow call: one
    flow batch (`run_together`), then one HiFT batch per vocoder input length (HiFT is not causal: padding
    would change a row's last samples). Each stream's chunk is what it would get alone, up to float rounding."""
    stats = [stream.stats for stream in streams]
    with timed_each(stats, "flow_chunk"):
        mels = run_together(list(calls))
    # Each stream's new mel prefixed by its previous frames, and its excitation tail (None on a first chunk).
    inputs = [stream.vocoder_input(mel) for stream, mel in zip(streams, mels)]
    batches: dict[tuple[int, bool], list[int]] = {}
    for index, (mel, cache_source) in enumerate(inputs):
        batches.setdefault((mel.size(2), cache_source is None), []).append(index)
    chunks: list[Tensor] = [torch.zeros(0)] * len(streams)
    for indices in batches.values():
        vocoder_mels = [inputs[i][0] for i in indices]
        cache_sources = [inputs[i][1] for i in indices]
        # One generator per row; streams of one Token2Wav either all have one or none do.
        generators = [streams[i].generator for i in indices]
        generator = generators if len(generators) > 1 and generators[0] is not None else generators[0]
        with timed_each([stats[i] for i in indices], "vocoder_chunk"):
            speech, source = streams[0].owner.hift.inference(
                mel=torch.cat(vocoder_mels),
                cache_source=None if cache_sources[0] is None else torch.cat(cache_sources), generator=generator)
        for row, i in enumerate(indices):
            chunks[i] = streams[i].emit(vocoder_mels[row], speech[row:row + 1], source[row:row + 1],
                                        calls[i].finalize)
    return chunks
