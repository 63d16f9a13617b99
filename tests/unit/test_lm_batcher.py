"""The LM batcher (lm_batcher.py): every stream's decoding on one thread, in shared forwards, each stream
getting exactly the tokens `CosyVoice2LM.generate` gives it alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM
from cosyapp.backends.cosyvoice2.lm_batcher import Decoding, LMBatcher
from cosyapp.backends.cosyvoice2.sampling import RasSampler

ROWS = 4
CONTEXT = 256
# (prompt length, seed, fixed length): the 9-token prompt with seed 2 samples a stop id after 19 tokens.
STREAMS = [(23, 0, 30), (40, 1, None), (9, 2, None)]
MIN_LEN, MAX_LEN = 5, 80


@pytest.fixture(scope="module")
def lm(tiny_cosyvoice2_dir: Path) -> CosyVoice2LM:
    model = CosyVoice2LM.from_pretrained(tiny_cosyvoice2_dir)
    model.setup_cache(ROWS, CONTEXT)
    return model


def prompt(lm: CosyVoice2LM, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randn(1, length, lm.config.llm_input_size, generator=generator)


def alone(lm: CosyVoice2LM, length: int, seed: int, fixed_length: int | None) -> list[int]:
    return list(lm.generate(prompt(lm, length), MIN_LEN, MAX_LEN, generator=torch.Generator().manual_seed(seed),
                            fixed_length=fixed_length, cache_row=ROWS - 1))


def start(batcher: LMBatcher, lm: CosyVoice2LM, row: int, length: int, seed: int,
          fixed_length: int | None) -> Decoding:
    return batcher.start(row, prompt(lm, length), lm.stop_rule(MIN_LEN, MAX_LEN, fixed_length),
                         torch.Generator().manual_seed(seed))


def take_all(decoding: Decoding, at_least: int | None = 1) -> list[int]:
    tokens: list[int] = []
    while (new := decoding.take(at_least)) is not None:
        tokens.extend(new)
    return tokens


def test_streams_joining_at_different_steps_get_their_own_tokens(lm: CosyVoice2LM) -> None:
    expected = [alone(lm, *stream) for stream in STREAMS]
    assert len(expected[2]) < MAX_LEN  # that stream ends at a sampled stop id
    batcher = LMBatcher(lm, ROWS)
    results: list[list[int]] = [[] for _ in STREAMS]
    # Each stream takes a first batch of tokens, then all go on together: the first one joined earliest, so
    # the rows are at different positions, and a row does not decode while its stream is away.
    first_batch_taken = threading.Barrier(len(STREAMS))

    def run(index: int) -> None:
        decoding = start(batcher, lm, index, *STREAMS[index])
        try:
            results[index] = decoding.take(at_least=7)
            first_batch_taken.wait()
            results[index] += take_all(decoding, at_least=7)
        finally:
            batcher.stop(decoding)

    first = threading.Thread(target=run, args=(0,))
    first.start()
    time.sleep(0.02)
    others = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join()
    assert results == expected
    assert max(batcher.batch_sizes) > 1  # rows really shared forwards


def test_prompts_of_different_lengths_prefill_together_as_alone(lm: CosyVoice2LM) -> None:
    lengths = [23, 40, 9]
    together = lm.prefill_logp([prompt(lm, n) for n in lengths], 0)
    # The 9-token prompt was padded to 40: its first decode step must not see the padding's keys.
    token = lm.speech_embedding(torch.tensor([[17]]))
    after_padding = lm.step_logp(token, 9, 2)
    for row, length in enumerate(lengths):
        alone_logp = lm.step_logp(prompt(lm, length), 0, ROWS - 1)
        torch.testing.assert_close(together[row], alone_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_padding, lm.step_logp(token, 9, ROWS - 1), rtol=1e-5, atol=1e-5)


def test_streams_joining_in_one_step_share_a_prefill(lm: CosyVoice2LM, monkeypatch: pytest.MonkeyPatch) -> None:
    prefills: list[tuple[int, int]] = []  # (first row, prompts) of each prefill forward
    real_prefill = lm.prefill_logp

    def counting_prefill(inputs: list[torch.Tensor], first_row: int) -> torch.Tensor:
        prefills.append((first_row, len(inputs)))
        return real_prefill(inputs, first_row)

    monkeypatch.setattr(lm, "prefill_logp", counting_prefill)
    batcher = LMBatcher(lm, ROWS)
    rows = [0, 1, 3]  # rows 0-1 are one run, row 3 another
    expected = [alone(lm, *stream) for stream in STREAMS]
    with batcher._cond:  # the batcher takes all three joiners in the same step
        decodings = [start(batcher, lm, row, *stream) for row, stream in zip(rows, STREAMS)]
    try:
        assert [take_all(d) for d in decodings] == expected
    finally:
        for decoding in decodings:
            batcher.stop(decoding)
    assert prefills == [(0, 2), (3, 1)]


def test_a_stopped_row_can_be_used_again_at_once(lm: CosyVoice2LM) -> None:
    batcher = LMBatcher(lm, ROWS)
    decoding = start(batcher, lm, 0, 23, 1, None)
    assert len(decoding.take(at_least=4)) >= 4
    batcher.stop(decoding)
    assert decoding.ended.is_set()
    leftover = decoding.take()  # what was made before the stop, then the end
    assert leftover is None or decoding.take() is None
    again = start(batcher, lm, 0, *STREAMS[2])
    try:
        assert take_all(again) == alone(lm, *STREAMS[2])
    finally:
        batcher.stop(again)


@pytest.mark.parametrize("run_ahead", [0, 6])
def test_a_row_decodes_ahead_of_its_stream_only_by_run_ahead(lm: CosyVoice2LM, run_ahead: int) -> None:
    batcher = LMBatcher(lm, ROWS, run_ahead=run_ahead)
    decoding = start(batcher, lm, 1, 9, 0, 30)
    try:
        taken = len(decoding.take(at_least=5))
        time.sleep(0.1)  # the stream is busy elsewhere: the row decodes at most run_ahead tokens meanwhile
        assert decoding.produced == taken + run_ahead
    finally:
        batcher.stop(decoding)


def test_a_cancelled_stream_stops_waiting_for_its_tokens(lm: CosyVoice2LM) -> None:
    # A decoding no batcher serves: its tokens never come, only the cancel ends the wait.
    decoding = Decoding(0, prompt(lm, 9), lm.stop_rule(MIN_LEN, MAX_LEN), RasSampler.from_config(lm.config))
    cancel = threading.Event()
    threading.Timer(0.05, cancel.set).start()
    started = time.monotonic()
    assert decoding.take(at_least=5, cancel=cancel) == []
    assert cancel.is_set() and time.monotonic() - started < 1.0


def test_a_failed_forward_reaches_the_stream_and_the_batcher_goes_on(lm: CosyVoice2LM) -> None:
    batcher = LMBatcher(lm, ROWS)
    decoding = batcher.start(0, torch.zeros(1, 5, 3), lm.stop_rule(MIN_LEN, MAX_LEN), None)  # wrong width
    with pytest.raises(RuntimeError):
        take_all(decoding)
    batcher.stop(decoding)
    healthy = start(batcher, lm, 0, *STREAMS[0])
    try:
        assert take_all(healthy) == alone(lm, *STREAMS[0])
    finally:
        batcher.stop(healthy)
