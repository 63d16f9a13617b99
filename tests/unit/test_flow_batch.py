"""Several streams' flow calls computed as one batch (flow_stream.run_together) against each stream alone."""

from __future__ import annotations


from pathlib import Path

import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.flow_stream import FlowStream, run_together
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator
from cosyapp.backends.cosyvoice2.token2wav import Token2Wav, Token2WavStream, vocode_together
from flow_inputs import hop_schedule, max_diff, random_prompt, random_tokens

# Batched and single forwards may sum in another order; the mels agree far below audible differences.
MEL_ATOL = 1e-5
AUDIO_ATOL = 1e-4  # the mels' rounding carried through the vocoder
PROMPT_TOKENS = 40
N_TOKENS = 260
HOP = 50
STREAMS = 3


def drive(streams: list[FlowStream], tokens: list[torch.Tensor], together: bool) -> list[list[torch.Tensor]]:
    """Every stream through the same hop schedule, then the final call; the mels of each call per stream."""
    mels: list[list[torch.Tensor]] = [[] for _ in streams]
    pushed = 0
    for end in [*hop_schedule(PROMPT_TOKENS, N_TOKENS, HOP), None]:
        finalize = end is None
        upto = N_TOKENS if finalize else end + 3
        pieces = [t[pushed:upto] for t in tokens]
        if together:
            results = run_together([s.prepare(p, finalize) for s, p in zip(streams, pieces)])
        else:
            results = [s.advance(p, finalize) for s, p in zip(streams, pieces)]
        for per_stream, mel in zip(mels, results):
            per_stream.append(mel)
        pushed = upto
    return mels


@pytest.mark.parametrize("left_chunks", [None, 2])
def test_batched_calls_equal_each_stream_alone(flow: CosyVoice2Flow, left_chunks: int | None) -> None:
    prompts = [random_prompt(flow, PROMPT_TOKENS, seed=10 + i) for i in range(STREAMS)]
    tokens = [random_tokens(flow, N_TOKENS, seed=20 + i) for i in range(STREAMS)]

    def streams() -> list[FlowStream]:
        return [FlowStream(flow, *p, exact_final=False, left_chunks=left_chunks) for p in prompts]

    alone = drive(streams(), tokens, together=False)
    together = drive(streams(), tokens, together=True)
    for stream_alone, stream_together in zip(alone, together):
        assert len(stream_alone) == len(stream_together) >= 4
        for a, b in zip(stream_alone, stream_together):
            assert a.shape[2] > 0
            assert max_diff(a, b) < MEL_ATOL
    # The streams really differ: a batch that mixed up rows would fail the comparison above.
    assert max_diff(alone[0][1], alone[1][1]) > 1e-2


def test_calls_in_different_states_still_run_right(flow: CosyVoice2Flow) -> None:
    """Streams at different positions (and one exact final call) in one run_together: the incremental calls go
    as one batch, and each gets its own result."""
    prompt = random_prompt(flow, PROMPT_TOKENS, seed=3)
    tokens = random_tokens(flow, N_TOKENS, seed=4)
    ahead, behind, reference = (FlowStream(flow, *prompt, exact_final=False) for _ in range(3))
    ahead.advance(tokens[:63])
    first_ahead, first_behind = ahead.prepare(tokens[63:113]), behind.prepare(tokens[:63])
    assert first_ahead.batch_key == first_behind.batch_key
    mel_ahead, mel_behind = run_together([first_ahead, first_behind])
    assert max_diff(mel_behind, reference.advance(tokens[:63])) < MEL_ATOL
    assert max_diff(mel_ahead, reference.advance(tokens[63:113])) < MEL_ATOL

    exact = FlowStream(flow, *prompt, exact_final=True)
    exact.advance(tokens[:63])
    exact_call = exact.prepare(tokens[63:], finalize=True)
    assert exact_call.batch_key is None
    expected = flow.inference(tokens[None], *prompt, streaming=False, finalize=True)[:, :, 2 * 60:]
    assert max_diff(run_together([exact_call])[0], expected) < MEL_ATOL


def calls_of(prompt_tokens: int, n_tokens: int, hop: int) -> list[tuple[int, int, bool]]:
    """One stream's calls on its own hop schedule: (first token, last token + look-ahead, finalize)."""
    calls, pushed = [], 0
    for end in hop_schedule(prompt_tokens, n_tokens, hop):
        calls.append((pushed, end + 3, False))
        pushed = end + 3
    return [*calls, (pushed, n_tokens, True)]


@pytest.mark.parametrize("left_chunks", [None, 1])
def test_streams_at_their_own_positions_batch_as_one(flow: CosyVoice2Flow, left_chunks: int | None) -> None:
    """Streams of different voices (prompt lengths), hops and lengths, so that every batch mixes positions,
    lengths, and final with non-final calls: each stream's mels are what it gets alone."""
    shapes = [(40, 260, 50), (17, 140, 25), (63, 200, 100), (30, 90, 25)]  # prompt tokens, tokens, hop
    prompts = [random_prompt(flow, p, seed=30 + i) for i, (p, _, _) in enumerate(shapes)]
    tokens = [random_tokens(flow, n, seed=40 + i) for i, (_, n, _) in enumerate(shapes)]
    schedules = [calls_of(p, n, hop) for p, n, hop in shapes]

    def streams() -> list[FlowStream]:
        return [FlowStream(flow, *prompt, exact_final=False, left_chunks=left_chunks) for prompt in prompts]

    alone = [[stream.advance(t[first:last], finalize) for first, last, finalize in schedule]
             for stream, t, schedule in zip(streams(), tokens, schedules)]
    together: list[list[torch.Tensor]] = [[] for _ in shapes]
    batched = streams()
    mixed_ends = False
    for round_ in range(max(len(schedule) for schedule in schedules)):
        members = [i for i, schedule in enumerate(schedules) if round_ < len(schedule)]
        calls = [batched[i].prepare(tokens[i][schedules[i][round_][0]:schedules[i][round_][1]],
                                    schedules[i][round_][2]) for i in members]
        assert len({call.batch_key for call in calls}) == 1
        mixed_ends |= len({call.finalize for call in calls}) > 1
        for i, mel in zip(members, run_together(calls)):
            together[i].append(mel)
    assert mixed_ends
    for stream_alone, stream_together in zip(alone, together):
        for a, b in zip(stream_alone, stream_together, strict=True):
            assert a.shape[2] > 0
            assert max_diff(a, b) < MEL_ATOL


@pytest.mark.parametrize("batch_positions", [False, True])
def test_last_chunks_batch_by_length(flow: CosyVoice2Flow, tiny_cosyvoice2_dir: Path, batch_positions: bool) -> None:
    """Streams whose LM is done share a key when their last chunks have one length (or always, batching positions
    as on a GPU); their last chunks computed together are what each gets alone."""
    config = CosyVoice2Config.from_model_dir(tiny_cosyvoice2_dir)
    hift = HiFTGenerator.from_pretrained(tiny_cosyvoice2_dir, config, "cpu")
    token2wav = Token2Wav(flow, hift, config, random_source=False, exact_final=False, batch_positions=batch_positions)
    prompt = random_prompt(flow, PROMPT_TOKENS, seed=5)

    def stream(count: int, seed: int) -> Token2WavStream:
        session = token2wav.new_stream(*prompt)
        session.add(random_tokens(flow, count, seed=seed))  # fewer than a first chunk: the last chunk is next
        return session

    first, second, longer = stream(20, 6), stream(20, 7), stream(21, 8)
    assert not first.chunk_ready() and first.chunk_key() is not None
    assert first.chunk_key() == second.chunk_key()
    assert (first.chunk_key() == longer.chunk_key()) is batch_positions
    together = vocode_together([first, second], [first.prepare_final(), second.prepare_final()])
    for chunk, seed in zip(together, (6, 7)):
        alone = stream(20, seed).finish()
        assert chunk.numel() > 0 and max_diff(chunk, alone) < AUDIO_ATOL
    assert max_diff(together[0], together[1]) > 1e-3  # the two streams' audio differs: rows were not mixed up
