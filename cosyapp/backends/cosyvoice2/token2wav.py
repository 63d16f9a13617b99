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
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow_stream import open_flow_stream
from cosyapp.engine.stats import StageTimes, timed

MEL_CACHE_FRAMES = 8  # mel frames re-vocoded at the start of every chunk after the first
MAX_HOP_CHUNKS = 4  # the hop grows up to 4 x chunk_size tokens
HOP_GROWTH = 2


class FlowModel(Protocol):
    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                  streaming: bool, finalize: bool) -> Tensor: ...


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
    all, exact; see flow_stream.py).
    """

    def __init__(self, flow: FlowModel, hift: Vocoder, config: CosyVoice2Config, random_source: bool = True,
                 incremental_flow: bool = True, exact_final: bool = True, flow_left_chunks: int | None = None) -> None:
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
        self._windows: dict[torch.device, Tensor] = {}

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
        # A non-streaming request is upstream's single full-attention call.
        self.flow_stream = open_flow_stream(owner.flow, prompt_token, prompt_feat, embedding,
                                            incremental=owner.incremental_flow,
                                            exact_final=owner.exact_final or not stream,
                                            left_chunks=owner.flow_left_chunks)
        self.flow_tokens = 0  # tokens handed to flow_stream
        self.generator = generator
        self.device = prompt_token.device
        self.token_pieces: list[Tensor] = []
        self.num_tokens = 0
        self.offset = 0  # tokens whose audio has been emitted (up to the withheld tail)
        self.hop = owner.chunk_size
        self.first_hop_pad = prompt_token_pad(prompt_token.shape[1], owner.chunk_size)
        self.cache: tuple[Tensor, Tensor, Tensor] | None = None  # (mel [1,80,8], source [1,1,S], speech [1,S])
        self.finished = False
        self.stats: StageTimes | None = None  # benchmarks: per-chunk flow and vocoder times

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
        while self.stream and self.num_tokens - self.offset >= self.next_hop() + self.owner.pre_lookahead:
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
        """Upstream `token2wav`: flow on tokens[:num_tokens], HiFT on the new frames, cross-fade, cache."""
        owner = self.owner
        with timed(self.stats, "flow_chunk"):
            mel = self.flow_stream.advance(self.all_tokens()[self.flow_tokens:num_tokens], finalize)
        self.flow_tokens = num_tokens
        cache_source = None
        if self.cache is not None:
            cache_mel, cache_source, _ = self.cache
            mel = torch.cat([cache_mel, mel], dim=2)
        with timed(self.stats, "vocoder_chunk"):
            speech, source = owner.hift.inference(mel=mel, cache_source=cache_source, generator=self.generator)
        if self.cache is not None:
            speech = self.cross_fade(speech, self.cache[2])
        if finalize:
            self.cache = None
            return speech[0]
        tail = owner.source_cache_len
        self.cache = (mel[:, :, -MEL_CACHE_FRAMES:], source[:, :, -tail:], speech[:, -tail:])
        return speech[0, :-tail]

    def cross_fade(self, speech: Tensor, previous_tail: Tensor) -> Tensor:
        """Fade the previous chunk's withheld tail out and this chunk's head in (float64 math, cast back)."""
        window = self.owner.fade_window(speech.device)
        n = previous_tail.shape[-1]
        head = speech[:, :n].double() * window[:n] + previous_tail.double() * window[n:]
        return torch.cat([head.to(speech.dtype), speech[:, n:]], dim=1)
