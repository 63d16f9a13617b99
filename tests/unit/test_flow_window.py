"""The streaming flow with a bounded left context (`left_chunks`, flow_stream.py) on the tiny model.

The reference is the exact, non-cached flow (`flow.inference(streaming=True)`: full relative-position
tables, every key present) with its chunk masks swapped for windowed ones built here, so it shares neither
the caches nor the windowed mask code with the incremental path.

Run as a script for the per-hop timing table along a 1100-token (44 s) utterance, exact vs windows:
    .venv/bin/python tests/unit/test_flow_window.py [MODEL_DIR [N_TOKENS]]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from cosyapp.backends.cosyvoice2 import estimator as estimator_module
from cosyapp.backends.cosyvoice2 import flow_encoder as encoder_module
from cosyapp.backends.cosyvoice2.chunk_cache import ChunkCache, ChunkWindow, normalized_left_chunks
from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.flow_stream import (FlowStream, RecomputeFlowStream, cache_bytes_per_frame,
                                                     open_flow_stream, window_cache_frames)
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator
from cosyapp.backends.cosyvoice2.token2wav import Token2Wav
from flow_inputs import (CHUNK_TOKENS, LOOKAHEAD, benchmark_model_dir, hop_schedule, max_diff, random_prompt,
                         random_tokens)

MEL_ATOL = 1e-4


def windowed_mask(length: int, chunk_size: int, left_chunks: int, pinned: int) -> torch.Tensor:
    """The rule, written out: query i sees key j when j's chunk is not after i's, and it is one of the
    left_chunks chunks before i's (or i's own) or j is a prompt position."""
    i = torch.arange(length).unsqueeze(1)
    j = torch.arange(length).unsqueeze(0)
    return (j // chunk_size <= i // chunk_size) & ((i // chunk_size - j // chunk_size <= left_chunks) | (j < pinned))


def windowed_reference(flow: CosyVoice2Flow, monkeypatch: pytest.MonkeyPatch, tokens: torch.Tensor,
                       prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor], left_chunks: int,
                       finalize: bool) -> torch.Tensor:
    """flow.inference over the prompt and `tokens` with chunk masks, the masks windowed (prompt pinned)."""
    prompt_tokens = prompt[0].size(1)

    def chunk_mask(length: int, chunk_size: int, device: torch.device, start: int = 0) -> torch.Tensor:
        assert start == 0, "the reference runs without caches"
        pinned = prompt_tokens * chunk_size // CHUNK_TOKENS  # the prompt at the token or the frame rate
        return windowed_mask(length, chunk_size, left_chunks, pinned).to(device)

    with monkeypatch.context() as patch:
        patch.setattr(encoder_module, "chunk_attention_mask", chunk_mask)
        patch.setattr(estimator_module, "chunk_attention_mask", chunk_mask)
        return flow.inference(tokens[None], *prompt, streaming=True, finalize=finalize)


def first_frame_outside_window(prompt_tokens: int, left_chunks: int, ratio: int = 2) -> int:
    """Output frame index (after the prompt's) of the first chunk whose window leaves out a speech frame:
    the first chunk c with (c - left_chunks) * 50 > 2 P."""
    chunk = ratio * CHUNK_TOKENS
    first_chunk = left_chunks + ratio * prompt_tokens // chunk + 1
    return first_chunk * chunk - ratio * prompt_tokens


def test_window_rule() -> None:
    window = ChunkWindow(chunk_size=5, left_chunks=2, pinned=7)
    positions = torch.arange(40)
    expected = [[(k // 5 <= q // 5) and (k // 5 >= q // 5 - 2 or k < 7) for k in range(40)] for q in range(40)]
    assert window.visible(positions, positions).tolist() == expected
    assert torch.equal(windowed_mask(40, 5, 2, 7), torch.tensor(expected))
    assert window.scaled(2) == ChunkWindow(10, 2, 14)
    assert window.first_needed(12) == 7 and window.first_needed(36) == 25  # the prompt, then chunk 7 - 2 = 5
    assert normalized_left_chunks(-1) is None and normalized_left_chunks(None) is None
    assert normalized_left_chunks(0) == 0
    with pytest.raises(ValueError, match="left_chunks"):
        normalized_left_chunks(-2)


def test_cache_drops_keys_outside_the_window() -> None:
    """Chunks of 2, 1 left chunk, 3 pinned positions: after committing 8 positions only 0..2 and 6..7 stay."""
    cache, attention = ChunkCache(window=ChunkWindow(chunk_size=2, left_chunks=1, pinned=3)), torch.nn.Identity()
    k = torch.arange(10.0).view(1, 1, 10, 1)
    cache.begin(new=8, keep=8)
    cache.extend_kv(attention, k[:, :, :8], k[:, :, :8])
    cache.commit()
    assert (cache.length, cache.held, cache.dropped) == (8, 5, 3)  # the next query (chunk 4) sees chunk 3 on
    cache.begin(new=2, keep=2)
    keys, values = cache.extend_kv(attention, k[:, :, 8:] + 100, k[:, :, 8:])
    assert keys.flatten().tolist() == [0.0, 1.0, 2.0, 6.0, 7.0, 108.0, 109.0]
    assert cache.key_positions(torch.device("cpu")).tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert cache.key_segments() == [(0, 3), (6, 4)]
    assert cache.window_mask(torch.device("cpu")).tolist() == [[True] * 7] * 2
    cache.commit()
    copy = cache.clone()
    assert (copy.length, copy.dropped) == (10, 5)
    copy.begin(new=1, keep=1)
    keys, _ = copy.extend_kv(attention, k[:, :, :1] - 1, k[:, :, :1])
    assert keys.flatten().tolist() == [0.0, 1.0, 2.0, 8.0 + 100, 9.0 + 100, -1.0]


@pytest.mark.parametrize("left_chunks", [1, 4])
def test_windowed_stream_matches_windowed_recompute(flow: CosyVoice2Flow, monkeypatch: pytest.MonkeyPatch,
                                                    left_chunks: int) -> None:
    """400 tokens in 100-token hops (4 estimator chunks per call, each with its own window): every call's
    new frames equal those of the windowed reference over everything, the fast final call included."""
    prompt_tokens, n_tokens = 40, 400
    prompt, tokens = random_prompt(flow, prompt_tokens), random_tokens(flow, n_tokens)
    reference = windowed_reference(flow, monkeypatch, tokens, prompt, left_chunks, finalize=True)
    one_pass = flow.inference(tokens[None], *prompt, streaming=True, finalize=True, left_chunks=left_chunks)
    assert max_diff(one_pass, reference) <= MEL_ATOL, "flow.inference(left_chunks=...)"
    stream = FlowStream(flow, *prompt, exact_final=False, left_chunks=left_chunks)
    offset = pushed = 0
    for end in hop_schedule(prompt_tokens, n_tokens, 100):
        mel = stream.advance(tokens[pushed:end + LOOKAHEAD])
        pushed = end + LOOKAHEAD
        assert max_diff(mel, reference[:, :, 2 * offset:2 * end]) <= MEL_ATOL, f"call ending at token {end}"
        offset = end
    assert stream.estimator_caches[0].dropped > 0 and stream.encoder_cache.tokens.dropped > 0
    mel = stream.advance(tokens[pushed:], finalize=True)
    assert max_diff(mel, reference[:, :, 2 * offset:]) <= MEL_ATOL, "final call"


def test_window_off_the_grid_and_forked(flow: CosyVoice2Flow, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hops of 37 tokens (each call recomputes the partial chunk the previous one left) from forks of a
    prefilled prompt: every call equals the windowed reference call over the tokens so far (the last 3 as
    look-ahead); the exact final call still sees everything."""
    prompt_tokens, left_chunks = 60, 1
    prompt, tokens = random_prompt(flow, prompt_tokens), random_tokens(flow, 200)
    voice = FlowStream(flow, *prompt, exact_final=True, left_chunks=left_chunks)
    voice.prefill_prompt()
    assert voice.committed == 50 and voice.estimator_caches[0].dropped == 0  # prompt positions are pinned
    stream, emitted, pushed = voice.fork(), 0, 0
    for end in range(37, 190, 37):
        mel = stream.advance(tokens[pushed:end + LOOKAHEAD])
        pushed = end + LOOKAHEAD
        reference = windowed_reference(flow, monkeypatch, tokens[:pushed], prompt, left_chunks, finalize=False)
        assert max_diff(mel, reference[:, :, 2 * emitted:]) <= MEL_ATOL, f"call ending at token {end}"
        emitted = end
    assert stream.estimator_caches[0].dropped > 0
    assert voice.committed == 50 and voice.estimator_caches[0].length == 100  # the fork left it alone
    mel = stream.advance(tokens[pushed:], finalize=True)
    reference = flow.inference(tokens[None], *prompt, streaming=False, finalize=True)[:, :, 2 * emitted:]
    assert max_diff(mel, reference) <= MEL_ATOL, "exact final call"


@pytest.mark.parametrize("left_chunks", [0, 2])
def test_window_changes_nothing_before_it_is_exceeded(flow: CosyVoice2Flow, left_chunks: int) -> None:
    """Frames whose chunks see every earlier chunk through the window are bit for bit the exact stream's;
    from the first chunk whose window leaves out a speech chunk on, the output departs from it."""
    prompt_tokens, n_tokens = 40, 300
    prompt, tokens = random_prompt(flow, prompt_tokens), random_tokens(flow, n_tokens)
    mels = {}
    for name, left in (("exact", None), ("window", left_chunks)):
        stream, pieces, pushed = FlowStream(flow, *prompt, exact_final=False, left_chunks=left), [], 0
        for end in hop_schedule(prompt_tokens, n_tokens, 50):
            pieces.append(stream.advance(tokens[pushed:end + LOOKAHEAD]))
            pushed = end + LOOKAHEAD
        pieces.append(stream.advance(tokens[pushed:], finalize=True))
        mels[name] = torch.cat(pieces, dim=2)
    boundary = first_frame_outside_window(prompt_tokens, left_chunks)
    assert boundary == 20 + 50 * left_chunks  # prompt frames 0..79: chunk 1 ends at 100, i.e. frame 20 after it
    assert torch.equal(mels["window"][:, :, :boundary], mels["exact"][:, :, :boundary])
    assert max_diff(mels["window"][:, :, boundary:boundary + 50], mels["exact"][:, :, boundary:boundary + 50]) > 1e-3


def run_long_stream(flow: CosyVoice2Flow, prompt: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    tokens: torch.Tensor, left_chunks: int | None, hop: int = 100
                    ) -> list[tuple[int, float, int, int]]:
    """Non-final calls of `hop` tokens along `tokens` -> per call (end token, flow ms, frames held, bytes)."""
    stream = FlowStream(flow, *prompt, exact_final=False, left_chunks=left_chunks)
    rows, pushed = [], 0
    for end in hop_schedule(prompt[0].size(1), tokens.numel(), hop):
        start = time.perf_counter()
        stream.advance(tokens[pushed:end + LOOKAHEAD])
        elapsed = 1000 * (time.perf_counter() - start)
        pushed = end + LOOKAHEAD
        rows.append((end, elapsed, stream.estimator_caches[0].held, stream.nbytes()))
    return rows


def test_cache_memory_is_bounded_by_the_window(flow: CosyVoice2Flow) -> None:
    """Along 1100 tokens (44 s) in 100-token hops, a windowed stream holds the prompt and left_chunks chunks
    between calls and its buffers stop growing; the exact stream's keep growing. Prints the per-hop flow
    time (one pass, not asserted: see the script for the best-of-3 table)."""
    prompt_tokens, hop = 102, 100
    prompt, tokens = random_prompt(flow, prompt_tokens), random_tokens(flow, 1100)
    per_frame = cache_bytes_per_frame(flow.config, torch.float32)
    runs = {left: run_long_stream(flow, prompt, tokens, left, hop) for left in (None, 4, 8)}
    print(f"\n{'tokens':>6} " + " ".join(f"{'left ' + str(left) if left else 'exact':>22}" for left in runs))
    for i, end in enumerate(row[0] for row in runs[None]):
        print(f"{end:>6} " + " ".join(f"{rows[i][1]:6.0f} ms {rows[i][3] / 2**20:6.1f} MiB" for rows in runs.values()))

    exact_bytes = [row[3] for row in runs[None]]
    assert exact_bytes[-1] > 1.5 * exact_bytes[len(exact_bytes) // 2]
    for left in (4, 8):
        rows = runs[left]
        assert all(held <= 2 * prompt_tokens + 50 * left for _, _, held, _ in rows), left
        assert rows[-1][2] == 2 * prompt_tokens + 50 * left  # the window is full
        bound = per_frame * window_cache_frames(flow.config, prompt_tokens, left, 2 * hop)
        assert max(row[3] for row in rows) <= bound + (1 << 20), left  # + the conv tails
        steady = [row[3] for row in rows if row[0] > prompt_tokens + 50 * left]
        assert len(steady) >= 3 and len(set(steady)) == 1, (left, steady)


def test_left_chunks_plumbing(flow: CosyVoice2Flow, tiny_cosyvoice2_dir: Path) -> None:
    prompt, tokens = random_prompt(flow, 40), random_tokens(flow, 160)
    assert open_flow_stream(flow, *prompt, left_chunks=-1).left_chunks is None
    stream = open_flow_stream(flow, *prompt, exact_final=False, left_chunks=1)
    assert stream.estimator_caches[0].window == ChunkWindow(50, 1, 80)
    assert stream.encoder_cache.tokens.window == ChunkWindow(25, 1, 40)
    assert stream.encoder_cache.frames.window == ChunkWindow(50, 1, 80)
    recompute = open_flow_stream(flow, *prompt, incremental=False, exact_final=False, left_chunks=1)
    assert isinstance(recompute, RecomputeFlowStream)
    pushed = 0
    for end in hop_schedule(40, 160, 50):
        mel = stream.advance(tokens[pushed:end + LOOKAHEAD])
        assert max_diff(mel, recompute.advance(tokens[pushed:end + LOOKAHEAD])) <= MEL_ATOL, f"call ending at {end}"
        pushed = end + LOOKAHEAD
    assert max_diff(stream.advance(tokens[pushed:], True), recompute.advance(tokens[pushed:], True)) <= MEL_ATOL
    with pytest.raises(ValueError, match="streaming=True"):
        flow.inference(tokens[None], *prompt, streaming=False, left_chunks=2)

    config = CosyVoice2Config.from_model_dir(tiny_cosyvoice2_dir)
    hift = HiFTGenerator.from_pretrained(tiny_cosyvoice2_dir, config)
    session = Token2Wav(flow, hift, config, flow_left_chunks=2).new_stream(*prompt)
    assert session.flow_stream.left_chunks == 2


def benchmark(model_dir: Path, n_tokens: int = 1100, hop: int = 100, repeats: int = 3) -> None:
    """Per-hop flow time along one utterance, exact vs left_chunks 4 and 8 (4 s / 8 s of left context): best of
    `repeats` runs of each call on forks of the same state, wall ms."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    flow = CosyVoice2Flow.from_pretrained(model_dir)
    prompt_tokens = 102
    prompt, tokens = random_prompt(flow, prompt_tokens), random_tokens(flow, n_tokens)
    lefts = (None, 4, 8)
    streams = {left: FlowStream(flow, *prompt, exact_final=False, left_chunks=left) for left in lefts}
    ends = hop_schedule(prompt_tokens, n_tokens, hop)
    times: dict[int | None, list[float]] = {left: [] for left in lefts}
    pushed = 0
    for end in ends:
        for left in lefts:
            best = float("inf")
            for _ in range(repeats):
                fork = streams[left].fork()
                start = time.perf_counter()
                fork.advance(tokens[pushed:end + LOOKAHEAD])
                best = min(best, 1000 * (time.perf_counter() - start))
            streams[left] = fork
            times[left].append(best)
        pushed = end + LOOKAHEAD
    names = ["exact" if left is None else f"left {left}" for left in lefts]
    print(f"{'call':>4} {'tokens':>6} " + " ".join(f"{name + ' ms':>11}" for name in names))
    for call, end in enumerate(ends):
        print(f"{call:>4} {end:>6} " + " ".join(f"{times[left][call]:>11.0f}" for left in lefts))
    print(f"{'last / second':>11} " + " ".join(f"{times[left][-1] / times[left][1]:>11.2f}" for left in lefts))


if __name__ == "__main__":
    benchmark(benchmark_model_dir(sys.argv), int(sys.argv[2]) if len(sys.argv) > 2 else 1100)
