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

Concurrent streams: `ChunkBatcher` computes the chunks of streams at the same point of the schedule as one
flow batch and one HiFT batch (`vocode_together`), each stream's result being what it gets alone.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
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
# How long the first stream to reach a chunk waits for other streams at the same point (ChunkBatcher).
# Streams in step arrive within a few milliseconds; the wait ends as soon as they are all there.
GATHER_WINDOW_S = 0.015
# A stream at most this many tokens short of the same chunk is waited for: a few LM steps away (requests that
# arrive a few milliseconds apart join the LM a few steps apart). While the others wait, the LM goes on decoding
# for the streams still short (on a CPU only for them: LMBatcher), a step every millisecond or two.
GATHER_SLACK_TOKENS = 8


class Vocoder(Protocol):
    def inference(self, mel: Tensor, cache_source: Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...


def prompt_token_pad(prompt_len: int, chunk_size: int) -> int:
    """Tokens added to the first hop so that prompt + first hop is a multiple of the chunk size."""
    return -prompt_len % chunk_size


class Token2Wav:
    """Flow + HiFT behind upstream's chunk schedule. Shared by all requests, so it holds no request state
    (only a per-device copy of the fade window); each `Token2WavStream` holds its own.

    `random_source=True` (the product default) gives each stream its own generator for HiFT's source
    noise, seeded from the request seed when there is one; `random_source=False` turns the noise off
    (upstream's output with its randomness patched out, as in the goldens).
    `incremental_flow` and `exact_final` choose the flow path, `flow_left_chunks` its left context (None:
    all, exact; see flow_stream.py). Incremental streams of a voice start from its prompt's prefilled flow
    state, computed once. `batching=True` computes the chunks of streams that reach the same point of their
    schedule together, as one flow and one vocoder batch cut into `batch_workers` parts (`ChunkBatcher`).
    """

    def __init__(self, flow: FlowModel, hift: Vocoder, config: CosyVoice2Config, random_source: bool = True,
                 incremental_flow: bool = True, exact_final: bool = True, flow_left_chunks: int | None = None,
                 batching: bool = False, batch_workers: int = 1) -> None:
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
        self.batcher = ChunkBatcher(workers=batch_workers) if batching else None
        self._windows: dict[torch.device, Tensor] = {}
        # id(prompt_token) -> (weak reference to it, its voice's prefilled flow state), least recent first.
        self._prefilled: OrderedDict[int, tuple[weakref.ref, FlowStream]] = OrderedDict()
        self._prefill_lock = threading.Lock()

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
        session = Token2WavStream(self, prompt_token, prompt_feat, embedding, stream, generator)
        if self.batcher is not None and stream:
            self.batcher.add(session)
        return session

    def open_flow_stream(self, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                         stream: bool) -> FlowStream | RecomputeFlowStream:
        """One request's flow state. A streaming incremental one is forked from the voice's prefilled state
        (computed on the voice's first request, kept for the PREFILLED_VOICES most recent voices)."""
        if not (stream and self.incremental_flow and isinstance(self.flow, CosyVoice2Flow)):
            # A non-streaming request is upstream's single full-attention call.
            return open_flow_stream(self.flow, prompt_token, prompt_feat, embedding, incremental=self.incremental_flow,
                                    exact_final=self.exact_final or not stream, left_chunks=self.flow_left_chunks)
        with self._prefill_lock:
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

    def full(self, tokens: Sequence[int] | Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
             seed: int | None = None) -> Tensor:
        """Non-streaming synthesis of all tokens at once -> waveform [n] on the model device."""
        session = self.new_stream(prompt_token, prompt_feat, embedding, stream=False, seed=seed)
        session.push(tokens)
        return session.finish()


class Token2WavStream:
    """The per-request state of `Token2Wav`: tokens so far, offset, hop, HiFT cache, noise generator."""

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
        # Tokens the LM (on its own thread) has made for this stream, pushed or still on their way: a chunk
        # batch waits for streams that will have its call's tokens as soon as they push what they hold.
        self.produced_tokens = 0
        self.offset = 0  # tokens whose audio has been emitted (up to the withheld tail)
        self.hop = owner.chunk_size
        self.first_hop_pad = prompt_token_pad(prompt_token.shape[1], owner.chunk_size)
        self.cache: tuple[Tensor, Tensor, Tensor] | None = None  # (mel [1,80,8], source [1,1,S], speech [1,S])
        self.finished = False  # finish() was called
        self.closed = False  # close() was called: no more calls
        self.stats: StageTimes | None = None  # benchmarks: per-chunk flow and vocoder times

    def count_produced(self) -> None:
        """One more token was made for this stream (called by the LM's thread)."""
        self.produced_tokens += 1

    def tokens_wanted(self) -> int | None:
        """How many more tokens the next chunk needs (at least 1); None when not streaming (all of them)."""
        if not self.stream:
            return None
        return max(1, self._tokens_short())

    def _tokens_short(self) -> int:
        """Tokens still missing before the next chunk can be computed (<= 0: it can)."""
        return self.offset + self.next_hop() + self.owner.pre_lookahead - self.num_tokens

    def next_hop(self) -> int:
        return self.hop + self.first_hop_pad if self.offset == 0 else self.hop

    def push(self, tokens: Sequence[int] | Tensor) -> list[Tensor]:
        """Add speech tokens; returns the chunks (1-D float32 tensors) that became ready, maybe none."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device).reshape(-1)
        if tokens.numel():
            self.token_pieces.append(tokens)
            self.num_tokens += tokens.numel()
        chunks: list[Tensor] = []
        while self.stream and self._tokens_short() <= 0:
            hop = self.next_hop()
            chunks.append(self.vocode(self.offset + hop + self.owner.pre_lookahead, finalize=False))
            self.offset += hop
            self.hop = min(self.owner.max_hop, self.hop * HOP_GROWTH)
        return chunks

    def finish(self) -> Tensor:
        """Vocode every remaining token (full attention) -> the last chunk, 1-D float32."""
        if self.finished:
            raise RuntimeError("finish() called twice")
        self.finished = True
        if self.num_tokens == 0:
            return torch.zeros(0, device=self.device)
        return self.vocode(self.num_tokens, finalize=True)

    def all_tokens(self) -> Tensor:
        if len(self.token_pieces) > 1:
            self.token_pieces = [torch.cat(self.token_pieces)]
        return self.token_pieces[0]

    def vocode(self, num_tokens: int, finalize: bool) -> Tensor:
        """Upstream `token2wav`: flow on tokens[:num_tokens], HiFT on the new frames, cross-fade, cache;
        batched with other streams at the same point when the owner batches."""
        call = self.flow_stream.prepare(self.all_tokens()[self.flow_tokens:num_tokens], finalize)
        self.flow_tokens = num_tokens
        if self.owner.batcher is not None:
            return self.owner.batcher.vocode(self, call)
        return vocode_together([self], [call])[0]

    def close(self) -> None:
        """The request is over (finished, failed or cancelled): stop counting on it for batches."""
        self.finished = self.closed = True
        if self.owner.batcher is not None:
            self.owner.batcher.forget(self)

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
    """The chunks of streams at the same point of their schedule (one stream, or the streams of a
    `ChunkBatcher` batch), each with its prepared flow call: one flow batch (`run_together`), then one HiFT
    batch. Each stream's chunk is what it would get alone, up to float rounding."""
    stats = [stream.stats for stream in streams]
    with timed_each(stats, "flow_chunk"):
        mels = run_together(list(calls))
    # Each stream's new mel prefixed by its previous frames, and its excitation tail (None on a first chunk).
    vocoder_mels, cache_sources = zip(*(stream.vocoder_input(mel) for stream, mel in zip(streams, mels)))
    # One generator per row; streams of one Token2Wav either all have one or none do.
    generators = [stream.generator for stream in streams]
    generator = generators if len(generators) > 1 and generators[0] is not None else generators[0]
    with timed_each(stats, "vocoder_chunk"):
        speech, source = streams[0].owner.hift.inference(
            mel=torch.cat(vocoder_mels), cache_source=None if cache_sources[0] is None else torch.cat(cache_sources),
            generator=generator)
    return [stream.emit(mel, speech[row:row + 1], source[row:row + 1], call.finalize)
            for row, (stream, mel, call) in enumerate(zip(streams, vocoder_mels, calls))]


@dataclass
class _Batch:
    """Streams computing their chunks together. Once gathered, the batch is cut into parts, one per worker
    (CPU cores): part p is computed by the thread of its first stream, all parts at the same time."""
    streams: list[Token2WavStream]
    calls: list[FlowCall]
    gathered: threading.Event = field(default_factory=threading.Event)
    parts: list[list[int]] = field(default_factory=list)
    chunks: dict[int, Tensor] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    parts_left: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def split(self, workers: int) -> None:
        count = len(self.streams)
        workers = min(workers, count)
        bounds = [count * w // workers for w in range(workers + 1)]
        self.parts = [list(range(bounds[w], bounds[w + 1])) for w in range(workers)]
        self.parts_left = workers
        self.gathered.set()

    def run_part(self, part: list[int]) -> None:
        try:
            chunks = vocode_together([self.streams[i] for i in part], [self.calls[i] for i in part])
            self.chunks.update(zip(part, chunks))
        except BaseException as exc:  # every stream of the batch gets the failure
            self.errors.append(exc)
        finally:
            with self.lock:
                self.parts_left -= 1
                if self.parts_left == 0:
                    self.done.set()


class ChunkBatcher:
    """Computes the chunks of streams that reach the same point of their schedule together.

    Streams of one voice that started together (or joined at the same position) make their flow calls with
    the same shapes and cache states; their flow and vocoder work then runs as one batch, which costs less
    than the streams' calls one by one. The first stream to arrive waits (at most GATHER_WINDOW_S) for the
    open streams that are at the same point, or a few LM steps short of it, then the batch is computed in
    `workers` parts at once, each by the thread of one of its streams (on a CPU: one part per core, each
    single-threaded; on a GPU: one part). Streams at other points, and calls that cannot be batched (full
    recomputation), run on their own thread as before, so unrelated streams still run in parallel.
    """

    def __init__(self, window_s: float = GATHER_WINDOW_S, workers: int = 1,
                 slack_tokens: int = GATHER_SLACK_TOKENS) -> None:
        self.window_s = window_s
        self.workers = workers
        self.slack_tokens = slack_tokens
        self._cond = threading.Condition()
        self._streams: weakref.WeakSet[Token2WavStream] = weakref.WeakSet()
        self._gathering: dict[tuple, _Batch] = {}
        self._busy: set[Token2WavStream] = set()  # streams whose chunk is being computed: not coming
        self.batch_sizes: dict[int, int] = {}  # batch size -> number of batches, for tests and benchmarks

    def add(self, stream: Token2WavStream) -> None:
        """A new stream whose chunks may be batched: batches gathering at its point wait for it."""
        with self._cond:
            self._streams.add(stream)

    def forget(self, stream: Token2WavStream) -> None:
        with self._cond:
            self._streams.discard(stream)
            self._busy.discard(stream)
            self._cond.notify_all()

    def vocode(self, stream: Token2WavStream, call: FlowCall) -> Tensor:
        key = None if call.batch_key is None else (call.batch_key, stream.offset, stream.cache is None,
                                                   stream.generator is None)
        with self._cond:
            self._busy.add(stream)
            batch = self._gathering.get(key) if key is not None else None
            if batch is not None:
                batch.streams.append(stream)
                batch.calls.append(call)
                self._cond.notify_all()
        try:
            leads = batch is None
            if leads:
                batch = _Batch([stream], [call])
                if key is not None:
                    self._gather(key, batch)
                batch.split(self.workers)
            else:
                batch.gathered.wait()
            index = batch.streams.index(stream)
            for part in batch.parts:
                if part[0] == index:
                    batch.run_part(part)
            batch.done.wait()
            if leads:
                with self._cond:
                    self.batch_sizes[len(batch.streams)] = self.batch_sizes.get(len(batch.streams), 0) + 1
            if batch.errors:
                raise batch.errors[0]
            return batch.chunks[index]
        finally:
            with self._cond:
                self._busy.discard(stream)
                self._cond.notify_all()

    def _gather(self, key: tuple, batch: _Batch) -> None:
        """Let streams at the same point join `batch` until none is missing or the window has passed."""
        leader = batch.streams[0]
        deadline = time.monotonic() + self.window_s
        with self._cond:
            self._gathering[key] = batch
            try:
                while any(self._coming(other, leader, self.slack_tokens)
                          for other in list(self._streams) if other not in self._busy):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                del self._gathering[key]

    @staticmethod
    def _coming(other: Token2WavStream, leader: Token2WavStream, slack_tokens: int) -> bool:
        """Whether `other` (not computing a chunk now) is about to make the same call as `leader`: it is at the
        same point of its schedule, at most `slack_tokens` tokens short of the call."""
        if other.closed or not isinstance(other.flow_stream, FlowStream):
            return False
        mine, theirs = leader.flow_stream, other.flow_stream
        if other.offset != leader.offset or theirs.committed != mine.committed or theirs.emitted != mine.emitted:
            return False
        return max(other.num_tokens, other.produced_tokens) >= leader.num_tokens - slack_tokens
