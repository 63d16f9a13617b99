"""The Fish model runner: batched, stateless calls over per-stream states that the caller owns.

One `FishStreamState` per stream holds everything that stream carries between calls: its KV-cache row (an
index into the model's shared caches, handed out by the caller's row pool), its prompt, frame budget and
stop token, its sampler settings and `torch.Generator`, the frames produced so far, and its codec decoder
state. The runner keeps no per-stream memory of its own, runs no threads and never waits; each call does the
work of every state it is given in one batched forward where shapes allow.

API (all calls run under `torch.inference_mode()`, on the thread that owns the model; a state is in at most
one call at a time):

* `FishRunner(model, codec, penalty_main_history=False)`; `runner.rows -> int`: the number of KV-cache rows
  (`max_streams` at load; the size of the caller's row pool).
* `backend.start_stream(request, row) -> FishStreamState` (FishBackend): checks the request (InputError as
  `synthesize` raises them), builds its prompt, budget and generator, and calls
  `runner.start(row, prompt, params, generator, budget, stop_id) -> FishStreamState`: a new state on cache
  row `row`; no model work. `prompt [11, P]`; `budget` frames at most, the first one included; `stop_id` the
  `<|im_end|>` id, or None for a fixed length (the stop token ignored, no frame dropped).
* `runner.prefill(states: Sequence[FishStreamState]) -> None`: one forward over the prompts (padded to the
  longest), then each state's first frame. Mutates `produced` (0 -> 1), `frames`, `finished` (a one-frame
  budget), the states' cache rows.
* `runner.decode_step(states: Sequence[FishStreamState]) -> None`: one slow-transformer step for every state
  (each at its own position over its own row), the fast transformer over the codebooks for all rows at
  once, then the stop check (one host sync per call). Mutates `produced` (+1), `frames`, `finished`,
  `stopped`, the cache rows. Every state must be prefilled and not finished.
* `state.decodable -> int`: frames ready for audio now (while generating, the newest frame is held back: it
  may turn out to be the last one, which S1 drops); `state.finished`, `state.stopped` (on the stop token),
  `state.decoded`, `state.produced`.
* `runner.codec_decode(work: Sequence[tuple[FishStreamState, int]]) -> list[np.ndarray]`: for each
  `(state, n)`, `1 <= n <= state.decodable`, the audio of the state's next n frames: float32 mono,
  `n * 2048` samples at 44.1 kHz, in the order given. Work with the same `codec_shape_key(state, n)` (n, and
  whether it is the stream's first chunk) goes through the codec in one batched call, whatever the streams'
  positions. Mutates `decoded` (+n), `codec_state`. A non-streaming request calls it once, after
  `finished`, with `state.decodable` frames.
* `runner.release(state) -> None`: the stream is over (finished, cancelled or failed); drops its codec state
  and refuses further calls with it. The caller returns `state.row` to its pool at once: the next stream on
  that row overwrites every cache slot before reading it, so nothing is cleared.
* `state.frames_so_far() -> Tensor [11, produced]`: main token + 10 codes per frame, the last one included
  (what the backend's `generate_frames` yields).

Misuse (a row twice in one call, a finished, released or unprefilled state, more frames than decodable)
raises ValueError before any model work, so a bad state cannot corrupt the others' rows.

Batching changes float reduction order (a matrix product over B rows is blocked differently from one over
one row), so logits differ from a lone stream's in the last bits; sampling is per row with the stream's
own generator, so a stream gets the same codes unless two candidates tie to within that rounding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cosyapp.backends.fish.codec import FishCodec, StreamState
from cosyapp.backends.fish.codec_batch import decode_batch
from cosyapp.backends.fish.dual_ar import CacheRows, DualARTransformer
from cosyapp.backends.fish.generate import PENALTY_WINDOW, penalty_window
from cosyapp.backends.fish.sampling import SamplingParams, sample, sampler_settings


@dataclass(eq=False)
class FishStreamState:
    """One stream's decoding state (see the module docstring for who mutates what)."""

    row: int  # its row in the model's shared KV caches
    prompt: Tensor  # [11, P] on the model's device
    budget: int  # frames at most, the prefill frame included
    stop_id: int | None  # <|im_end|>; None: fixed length, the stop token is ignored and no frame dropped
    settings: Tensor  # float32 [3]: temperature, top_p, repetition penalty (`sampler_settings`)
    generator: torch.Generator
    frames: Tensor  # [11, 1 + max(budget, 16)]: column 0 the prefill frame, then S1's zero-padded history
    produced: int = 0  # frames generated
    finished: bool = False
    stopped: bool = False  # ended on the stop token (not the budget)
    decoded: int = 0  # frames turned into audio
    codec_state: StreamState = field(default_factory=dict)
    released: bool = False

    @property
    def prompt_len(self) -> int:
        return self.prompt.shape[-1]

    @property
    def drop_last(self) -> bool:
        """S1 drops the last generated frame unless the length is fixed."""
        return self.stop_id is not None

    @property
    def decodable(self) -> int:
        """Frames ready for audio now: the newest is held back (it may be the last one, which is dropped)."""
        usable = self.produced - 1 if self.drop_last else self.produced
        return max(0, usable - self.decoded)

    def frames_so_far(self) -> Tensor:
        return self.frames[:, : self.produced]


def codec_shape_key(state: FishStreamState, frames: int) -> tuple[bool, int]:
    """States whose next codec call has the same key decode in one batched call: the same number of frames,
    and all on their first chunk or all past it (then their conv contexts have the same sizes; positions and
    attention windows may differ, the codec pads and masks them)."""
    return state.decoded == 0, frames


class FishRunner:
    """Batched calls over `FishStreamState`s (see the module docstring). `penalty_main_history` (the backend's
    load option) applies to every stream, so that all rows' penalty ids have one shape; the field of the same
    name in `SamplingParams` is not read here."""

    def __init__(self, model: DualARTransformer, codec: FishCodec, penalty_main_history: bool = False) -> None:
        self.model = model
        self.codec = codec
        self.device = model.output.weight.device
        self.penalty_main_history = penalty_main_history
        self.fast_width = codec.cfg.residual_codebook_size  # S1 samples codebooks 1.. from these logits only
        self.n_frame_rows = model.config.num_codebooks + 1

    @property
    def rows(self) -> int:
        cache = self.model.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[0]

    def start(self, row: int, prompt: Tensor, params: SamplingParams, generator: torch.Generator, budget: int,
              stop_id: int | None) -> FishStreamState:
        if not 0 <= row < self.rows:
            raise ValueError(f"cache row {row} is outside the {self.rows} rows")
        if budget < 1:
            raise ValueError(f"the frame budget must be at least 1, got {budget}")
        frames = torch.zeros(self.n_frame_rows, 1 + max(budget, PENALTY_WINDOW), dtype=torch.long,
                             device=self.device)
        return FishStreamState(row=row, prompt=prompt.to(self.device), budget=budget, stop_id=stop_id,
                               settings=sampler_settings(params, self.device), generator=generator, frames=frames)

    @torch.inference_mode()
    def prefill(self, states: Sequence[FishStreamState]) -> None:
        self._check(states, prefilled=False)
        lengths = [state.prompt_len for state in states]
        longest = max(lengths)
        grid = torch.zeros(len(states), self.n_frame_rows, longest, dtype=torch.long, device=self.device)
        for i, state in enumerate(states):
            grid[i, :, : state.prompt_len] = state.prompt
        positions = torch.arange(longest, device=self.device).expand(len(states), longest)
        last = torch.tensor(lengths, device=self.device) - 1
        rows = CacheRows.of([state.row for state in states], self.device)
        logits, hidden = self.model.forward_rows(grid, rows, positions, last, longest)
        frames = self._sample_frames(states, logits, hidden, rows, None)
        for i, state in enumerate(states):
            state.frames[:, 0] = frames[i]
            state.produced = 1
            state.finished = state.budget == 1

    @torch.inference_mode()
    def decode_step(self, states: Sequence[FishStreamState]) -> None:
        self._check(states, prefilled=True)
        inputs = torch.stack([state.frames[:, state.produced - 1] for state in states])[:, :, None]
        steps = [state.prompt_len + state.produced - 1 for state in states]
        positions = torch.tensor(steps, device=self.device)[:, None]
        last = torch.zeros(len(states), dtype=torch.long, device=self.device)
        rows = CacheRows.of([state.row for state in states], self.device)
        logits, hidden = self.model.forward_rows(inputs, rows, positions, last, max(steps) + 1)
        windows = torch.stack([penalty_window(state.frames, state.produced - 1) for state in states])
        frames = self._sample_frames(states, logits, hidden, rows, windows)
        for i, state in enumerate(states):
            state.frames[:, state.produced] = frames[i]
            state.produced += 1
        for state, main in zip(states, frames[:, 0].tolist()):  # the batch's one host sync
            state.stopped = state.stop_id is not None and main == state.stop_id
            state.finished = state.stopped or state.produced == state.budget

    def _sample_frames(self, states: Sequence[FishStreamState], logits: Tensor, hidden: Tensor, rows: CacheRows,
                       windows: Tensor | None) -> Tensor:
        """Frames `[B, 11]` from the slow outputs: the main token from the logits, then codebook k from the
        fast transformer fed the slow hidden state and codes 0..k-1. `windows [B, 11, 16]`: the penalty
        histories (None for the prefill frame, which is not penalised)."""
        model = self.model
        settings = torch.stack([state.settings for state in states])
        generators = [state.generator for state in states]
        main_ids = None
        if windows is not None:  # S1 penalises the main token with one frame's 11 values (a slicing quirk)
            main_ids = windows[:, 0] if self.penalty_main_history else windows[:, :, 0]
        main = sample(logits, settings, main_ids, generators)
        # S1 clamps only below; the upper clamp keeps a sampled vocabulary-padding id from crashing the lookup.
        code = (main - model.semantic_begin_id).clamp(0, model.config.codebook_size - 1)
        codes = [code]
        model.fast_forward_rows(hidden, 0, rows)  # position 0 only fills the cache; its logits are unused
        for k in range(1, model.config.num_codebooks):
            fast_logits = model.fast_forward_rows(model.fast_embeddings(code), k, rows)[:, : self.fast_width]
            code = sample(fast_logits, settings, None if windows is None else windows[:, k + 1], generators)
            codes.append(code)
        return torch.stack([main, *codes], dim=1)

    @torch.inference_mode()
    def codec_decode(self, work: Sequence[tuple[FishStreamState, int]]) -> list[np.ndarray]:
        groups: dict[tuple[bool, int], list[int]] = defaultdict(list)
        for i, (state, frames) in enumerate(work):
            if state.released:
                raise ValueError(f"the stream on row {state.row} was released")
            if not 1 <= frames <= state.decodable:
                raise ValueError(f"row {state.row}: {frames} frames asked for, {state.decodable} ready")
            groups[codec_shape_key(state, frames)].append(i)
        if len({id(state) for state, _ in work}) != len(work):
            raise ValueError("a stream appears twice in one codec call")
        audio: list[np.ndarray | None] = [None] * len(work)
        for (_, frames), members in groups.items():
            states = [work[i][0] for i in members]
            codes = torch.stack([state.frames[1:, state.decoded:state.decoded + frames] for state in states])
            samples, codec_states = decode_batch(self.codec, codes, [state.codec_state for state in states])
            for i, state, codec_state, row in zip(members, states, codec_states, samples[:, 0].float().cpu().numpy()):
                state.codec_state = codec_state
                state.decoded += frames
                audio[i] = row
        return audio

    def release(self, state: FishStreamState) -> None:
        state.released = True
        state.finished = True
        state.codec_state = {}

    def _check(self, states: Sequence[FishStreamState], prefilled: bool) -> None:
        if not states:
            raise ValueError("no streams given")
        rows = [state.row for state in states]
        if len(set(rows)) != len(rows):
            raise ValueError(f"two streams share a cache row: {rows}")
        for state in states:
            if state.released or state.finished:
                raise ValueError(f"the stream on row {state.row} is {'released' if state.released else 'finished'}")
            if (state.produced > 0) != prefilled:
                raise ValueError(f"the stream on row {state.row} is {'not yet' if prefilled else 'already'} "
                                 f"prefilled")
