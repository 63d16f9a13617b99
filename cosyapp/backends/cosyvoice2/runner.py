"""The CosyVoice model runner (CosyVoice2, and CosyVoice3 through the same calls): batched, stateless calls over
per-stream states that the engine's core owns.

- `open`: the frontend work of a request (sentences, prompt ids, voice features) -> a `CosyVoiceStream` in
  its KV-cache row, with its own sampling generator.
- `prefill`: each state's next sentence: LM input, stop rule, its token2wav session (flow and vocoder caches),
  then the prompts of states in consecutive rows in one forward each, and every state's first token.
- `decode`: one token for every state in ONE forward over the contiguous rows 0..highest (the cache is read
  through views, not gathered); a row in that range that is not decoding gets a dummy input at the position its
  next real step writes, so the dummy key/value is overwritten before anyone reads it. Sampling is each
  stream's own (decoding.py), so a stream gets the tokens it gets alone.
- `prepare_audio`, `compute_audio`, `finish_audio`: each state's next chunk; states of one `audio_key` (the
  same point of the same schedule) go through the flow and the vocoder as one batch (token2wav.py
  `prepare_group` takes the chunk's tokens and moves the schedule on, `compute_group` is the math, which
  touches only the session's flow and vocoder caches, so the core may run it while the LM decodes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch

from cosyapp.backends.cosyvoice2.decode_graphs import StaticDecodeStep
from cosyapp.backends.cosyvoice2.decoding import Decoding, accept, stop_rule
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM, length_limits
from cosyapp.backends.cosyvoice2.sampling import RasSampler
from cosyapp.engine.sizing import core_threads
from cosyapp.engine.stats import timed
from cosyapp.engine.types import InputError, SynthesisRequest


@dataclass(eq=False)
class CosyVoiceStream:
    """One request's state: its row, generator, sentences, the current sentence's decoding and session."""
    request: SynthesisRequest
    voice: Any
    sentences: list[list[int]]
    prompt_ids: list[int] | None
    generator: torch.Generator
    row: int
    sentence: int = 0  # index of the sentence being synthesized
    lm: Decoding | None = None
    lm_input: torch.Tensor | None = None  # [1, L, hidden] until prefilled
    session: Any = None  # the sentence's token2wav stream
    keep: Callable[[int], bool] | None = None  # which tokens reach the vocoder (None: all)
    error: BaseException | None = None
    finished: bool = False
    tokens: list[int] = field(default_factory=list)  # every speech token the LM made for the request, in order

    # ---- what the scheduler reads (engine/scheduler.py StreamState) ----

    @property
    def needs_prefill(self) -> bool:
        return not self.finished and self.session is None

    @property
    def decoding(self) -> bool:
        return self.lm is not None and not self.lm.ended

    @property
    def tokens_short(self) -> int:
        if self.session is None or not self.session.stream:
            return 1  # a request made in one piece has its audio only at the end of each sentence
        return self.session.tokens_short()

    @property
    def audio_pending(self) -> bool:
        return self.session is not None and not self.session.finished

    @property
    def audio_key(self) -> Hashable | None:
        return None if self.session is None else self.session.chunk_key()


def consecutive_rows(states: list[CosyVoiceStream]) -> list[list[CosyVoiceStream]]:
    """States sorted by row -> runs of them in consecutive cache rows (one prefill forward each)."""
    runs: list[list[CosyVoiceStream]] = []
    for state in states:
        if runs and runs[-1][-1].row + 1 == state.row:
            runs[-1].append(state)
        else:
            runs.append([state])
    return runs


class CosyVoiceRunner:
    """Model runner of a CosyVoice backend (`backend` gives the frontend, LM, token2wav and the few places where
    CosyVoice2 and CosyVoice3 differ: `_prompt_ids`, `new_session`, `token_filter`)."""

    def __init__(self, backend: Any, rows: int, static_step: StaticDecodeStep | None = None,
                 run_ahead: int = 0) -> None:
        self.backend = backend
        self.llm: CosyVoice2LM = backend.llm
        self.rows = rows
        self.run_ahead = run_ahead
        self.static_step = static_step
        token2wav = getattr(backend, "token2wav", None)  # a runner over the LM alone (tests) has none
        audio_stage = (token2wav.flow, token2wav.hift) if token2wav is not None else ()
        self.threads = core_threads(self.llm.device, rows, *audio_stage)
        self._next_position = [0] * rows  # per cache row: where its next decode step writes

    def open(self, request: SynthesisRequest, row: int) -> CosyVoiceStream:
        backend = self.backend
        with timed(request.stats, "frontend"):
            voice = backend._features(request.voice)
            sentences = backend.frontend.text_sentences(request.text)
            prompt_ids = backend._prompt_ids(request)
        generator = torch.Generator(device=backend.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        return CosyVoiceStream(request, voice, list(sentences), prompt_ids, generator, row,
                               finished=not sentences)

    # ---- LM ----

    def _begin_sentence(self, state: CosyVoiceStream) -> None:
        backend, request = self.backend, state.request
        with timed(request.stats, "frontend"):
            model_input = backend.frontend.build_model_input(request.mode, state.sentences[state.sentence],
                                                             state.voice, state.prompt_ids)
            lm_input = self.llm.build_lm_input(model_input.text, model_input.prompt_text,
                                               model_input.llm_prompt_speech_token)
        min_len, max_len = length_limits(model_input.text_len)
        room = backend.lm_context - lm_input.shape[1]
        if request.fixed_length is not None and request.fixed_length > room:
            raise InputError(f"fixed_length {request.fixed_length} exceeds the LM context left ({room} tokens)")
        max_len = min(max_len, room)
        if max_len <= min_len:
            raise InputError("prompt and sentence are too long for the LM context; use a shorter prompt or text")
        rule = stop_rule(self.llm, min_len, max_len, request.fixed_length)
        state.lm = Decoding(state.row, lm_input.shape[1], rule, RasSampler.from_config(self.llm.config,
                                                                                       state.generator))
        state.lm_input = lm_input
        state.session = backend.new_session(model_input, request)
        state.session.stats = request.stats
        state.keep = backend.token_filter()

    def prefill(self, states: Sequence[CosyVoiceStream]) -> None:
        started = []
        for state in states:
            try:
                self._begin_sentence(state)
                started.append(state)
            except Exception as exc:  # this stream's input: it fails alone
                state.error = exc
        if started:
            self.prefill_rows(started)

    def prefill_rows(self, states: Sequence[CosyVoiceStream]) -> None:
        """The LM inputs of states whose sentence has begun into their rows (consecutive rows in one forward),
        and each one's first token."""
        states = sorted(states, key=lambda s: s.row)
        logp: list[torch.Tensor] = []
        for run in consecutive_rows(states):
            logp.extend(self.llm.prefill_logp([s.lm_input for s in run], run[0].row).unbind(0))
        for state in states:
            state.lm_input = None  # the prompt is in the cache now
            self._next_position[state.row] = state.lm.prompt_len
        self._accept(states, torch.stack(logp), 0.0)

    def decode(self, states: Sequence[CosyVoiceStream]) -> None:
        started = time.perf_counter()
        rows = max(s.row for s in states) + 1
        fixed_rows = self.static_step.size_for(rows) if self.static_step is not None else None
        rows = fixed_rows or rows
        index = torch.tensor([s.row for s in states], device=self.llm.device)
        embedded = self.llm.speech_embedding(torch.cat([s.lm.token for s in states]))
        x = embedded.new_zeros(rows, 1, embedded.shape[-1])
        x[index, 0] = embedded
        positions = list(self._next_position[:rows])
        for state in states:
            positions[state.row] = state.lm.next_position
            self._next_position[state.row] = positions[state.row] + 1
        input_pos = torch.tensor(positions, device=self.llm.device).view(rows, 1)
        if fixed_rows is not None:
            logp = self.static_step(x, input_pos)
        else:
            logp = self.llm.speech_logp(self.llm(x, input_pos, 0, max(positions) + 1)[:, -1])
        self._accept(list(states), logp[index], time.perf_counter() - started)

    def _accept(self, states: list[CosyVoiceStream], logp: torch.Tensor, elapsed: float) -> None:
        accept([s.lm for s in states], logp)
        for state in states:
            tokens, state.lm.tokens = state.lm.tokens, []
            state.tokens.extend(tokens)
            if state.request.stats is not None and tokens:
                state.request.stats.add("lm_token", elapsed)
            if state.keep is not None:
                tokens = [token for token in tokens if state.keep(token)]
            if tokens:
                state.session.add(tokens)

    # ---- audio ----

    def prepare_audio(self, states: Sequence[CosyVoiceStream]) -> tuple[list[Any], list[Any]]:
        sessions = [s.session for s in states]
        return sessions, self.backend.token2wav.prepare_group(sessions)

    def compute_audio(self, work: tuple[list[Any], list[Any]]) -> list[np.ndarray]:
        sessions, calls = work
        return [chunk.float().cpu().numpy() for chunk in self.backend.token2wav.compute_group(sessions, calls)]

    def finish_audio(self, states: Sequence[CosyVoiceStream], chunks: list[np.ndarray]) -> list[list[np.ndarray]]:
        for state in states:
            if state.session is not None and state.session.finished:  # the sentence's last chunk: next, or the end
                state.session = state.lm = None
                state.sentence += 1
                state.finished = state.sentence >= len(state.sentences)
        return [[chunk] for chunk in chunks]

    def close(self, state: CosyVoiceStream) -> None:
        state.session = state.lm = state.lm_input = None
        state.finished = True
