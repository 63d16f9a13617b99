"""The incremental streaming flow (flow_stream.py) against recomputing everything, on the tiny model.

Run as a script for the per-chunk timing benchmark (recompute vs incremental along a 600-token utterance):
    .venv/bin/python tests/unit/test_flow_incremental.py [MODEL_DIR [N_TOKENS]]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch

from cosyapp.backends.cosyvoice2.chunk_cache import ChunkCache
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.flow_stream import FlowStream, cache_bytes_per_frame
from flow_inputs import benchmark_model_dir, hop_schedule, max_diff, random_prompt, random_tokens

MEL_ATOL = 1e-4
PROMPT_TOKENS = 40
N_TOKENS = 600
HOP = 100


def test_long_stream_matches_recompute_everything(flow: CosyVoice2Flow) -> None:
    """600 random tokens in 100-token hops. Chunk masks make every non-final call's new frames equal to the
    same frames of the chunk-masked call over the whole sequence (their look-ahead tokens are real tokens
    in both), so one recomputation of everything checks all calls, the fast final call included; two calls
    are also checked against upstream's own call (prompt and tokens so far, the last 3 as look-ahead)."""
    prompt, tokens = random_prompt(flow, PROMPT_TOKENS), random_tokens(flow, N_TOKENS)
    everything = flow.inference(tokens[None], *prompt, streaming=True, finalize=True)
    ends = hop_schedule(PROMPT_TOKENS, N_TOKENS, HOP)
    assert len(ends) == 5
    stream = FlowStream(flow, *prompt, exact_final=False)
    offset = pushed = 0
    for end in ends:
        mel = stream.advance(tokens[pushed:end + 3])
        pushed = end + 3
        assert mel.shape == (1, 80, 2 * (end - offset))
        assert max_diff(mel, everything[:, :, 2 * offset:2 * end]) <= MEL_ATOL, f"call ending at token {end}"
        if end in (ends[1], ends[-1]):
            upstream = flow.inference(tokens[None, :pushed], *prompt, streaming=True, finalize=False)
            assert max_diff(mel, upstream[:, :, 2 * offset:]) <= MEL_ATOL, f"upstream call ending at token {end}"
        offset = end
    assert stream.committed == PROMPT_TOKENS + offset
    mel = stream.advance(tokens[pushed:], finalize=True)
    assert max_diff(mel, everything[:, :, 2 * offset:]) <= MEL_ATOL, "final call"


def test_each_hop_runs_only_its_frames(flow: CosyVoice2Flow) -> None:
    """Per-chunk work does not grow with the position: every 100-token hop feeds the estimator its 200
    frames and the encoder its 100 tokens, wherever it sits in the utterance."""
    prompt, tokens = random_prompt(flow, PROMPT_TOKENS), random_tokens(flow, N_TOKENS)
    stream = FlowStream(flow, *prompt, exact_final=False)
    ends = hop_schedule(PROMPT_TOKENS, N_TOKENS, HOP)
    pushed = ends[0] + 3
    stream.advance(tokens[:pushed])
    estimator_frames: list[int] = []
    encoder_tokens: list[int] = []
    estimator_forward, encoder_forward = flow.decoder.estimator.forward, flow.encoder.forward

    def estimator_spy(x, *args, **kwargs):
        estimator_frames.append(x.size(2))
        return estimator_forward(x, *args, **kwargs)

    def encoder_spy(x, *args, **kwargs):
        encoder_tokens.append(x.size(1))
        return encoder_forward(x, *args, **kwargs)

    flow.decoder.estimator.forward, flow.encoder.forward = estimator_spy, encoder_spy
    try:
        for end in ends[1:]:
            stream.advance(tokens[pushed:end + 3])
            pushed = end + 3
    finally:
        del flow.decoder.estimator.forward, flow.encoder.forward
    calls = len(ends) - 1
    assert calls >= 4
    assert estimator_frames == [2 * HOP] * (10 * calls)
    assert encoder_tokens == [HOP] * calls


def test_calls_off_the_chunk_grid_match_upstream(flow: CosyVoice2Flow) -> None:
    """Hops of 37 tokens end inside chunks: the trailing partial chunk is recomputed by the next call, and
    every call still returns exactly upstream's new frames for that call."""
    prompt, tokens = random_prompt(flow, 30), random_tokens(flow, 160)
    stream = FlowStream(flow, *prompt, exact_final=True)
    emitted = pushed = 0
    for end in range(37, 150, 37):
        mel = stream.advance(tokens[pushed:end + 3])
        pushed = end + 3
        reference = flow.inference(tokens[None, :pushed], *prompt, streaming=True, finalize=False)[:, :, 2 * emitted:]
        assert max_diff(mel, reference) <= MEL_ATOL, f"call ending at token {end}"
        assert stream.committed == (30 + end) // 25 * 25
        emitted = end
    mel = stream.advance(tokens[pushed:], finalize=True)
    reference = flow.inference(tokens[None], *prompt, streaming=False, finalize=True)[:, :, 2 * emitted:]
    assert max_diff(mel, reference) <= MEL_ATOL, "exact final call"


def test_cache_limit_falls_back_to_recompute(flow: CosyVoice2Flow) -> None:
    prompt, tokens = random_prompt(flow, PROMPT_TOKENS), random_tokens(flow, 150)
    stream = FlowStream(flow, *prompt, exact_final=False, max_cache_frames=250)
    offset = pushed = 0
    for end in hop_schedule(PROMPT_TOKENS, 150, 50):  # 200 frames cached, then 300: over the limit
        mel = stream.advance(tokens[pushed:end + 3])
        pushed = end + 3
        reference = flow.inference(tokens[None, :pushed], *prompt, streaming=True, finalize=False)[:, :, 2 * offset:]
        assert max_diff(mel, reference) <= MEL_ATOL, f"call ending at token {end}"
        assert stream.recompute == (2 * (PROMPT_TOKENS + end) > 250)
        offset = end
    assert stream.recompute and stream.nbytes() == 0
    mel = stream.advance(tokens[pushed:], finalize=True)
    reference = flow.inference(tokens[None], *prompt, streaming=True, finalize=True)[:, :, 2 * offset:]
    assert max_diff(mel, reference) <= MEL_ATOL, "final call"


def test_forks_of_a_prefilled_prompt_are_independent(flow: CosyVoice2Flow) -> None:
    prompt = random_prompt(flow, 60)
    voice = FlowStream(flow, *prompt, exact_final=False)
    voice.prefill_prompt()
    assert voice.committed == 50  # (60 - 3) // 25 * 25
    first, second = voice.fork(), voice.fork()
    a, b = random_tokens(flow, 93, seed=2), random_tokens(flow, 93, seed=3)
    mel_a, mel_b = first.advance(a[:68]), second.advance(b[:68])  # 60 + 65 = 125 = 5 chunks
    for tokens, mel in ((a, mel_a), (b, mel_b)):
        fresh = FlowStream(flow, *prompt, exact_final=False).advance(tokens[:68])
        assert max_diff(mel, fresh) <= MEL_ATOL
    assert voice.committed == 50 and first.committed == second.committed == 125
    mel_a = first.advance(a[68:], finalize=True)
    reference = flow.inference(a[None], *prompt, streaming=True, finalize=True)[:, :, 2 * 65:]
    assert max_diff(mel_a, reference) <= MEL_ATOL


def test_lifecycle_errors(flow: CosyVoice2Flow) -> None:
    prompt = random_prompt(flow, PROMPT_TOKENS)
    stream = FlowStream(flow, *prompt)
    with pytest.raises(ValueError, match="prompt_feat"):
        FlowStream(flow, prompt[0], prompt[1][:, :-1], prompt[2])
    assert stream.advance(random_tokens(flow, 2)).shape == (1, 80, 0)  # nothing past the look-ahead yet
    with pytest.raises(RuntimeError, match="before the first advance"):
        stream.prefill_prompt()
    stream.advance(random_tokens(flow, 30), finalize=True)
    with pytest.raises(RuntimeError, match="after the final call"):
        stream.advance(random_tokens(flow, 5))


def test_chunk_cache_commits_up_to_keep() -> None:
    cache, conv = ChunkCache(), torch.nn.Identity()
    cache.begin(new=5, keep=3)
    x = torch.arange(5.0).view(1, 1, 5)
    assert cache.conv_input(conv, x, context=2).tolist() == [[[0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]]]
    k = torch.arange(5.0).view(1, 1, 5, 1)
    keys, _ = cache.extend_kv(conv, k, k)
    assert keys.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    cache.commit()
    assert cache.length == 3
    cache.begin(new=2, keep=2)  # positions 3, 4 again
    assert cache.conv_input(conv, x[:, :, 3:], context=2).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    keys, _ = cache.extend_kv(conv, k[:, :, 3:] + 10, k[:, :, 3:])
    assert keys.flatten().tolist() == [0.0, 1.0, 2.0, 13.0, 14.0]
    with pytest.raises(ValueError, match="limit"):
        ChunkCache(max_length=4).begin(new=5, keep=5)


def test_cache_budget_of_the_real_model(flow: CosyVoice2Flow) -> None:
    """CosyVoice2-0.5B: 10 steps x 2 CFG rows x 56 blocks x (K + V of 8 x 64) estimator values per frame,
    plus 6 token-rate (half a frame each) and 4 frame-rate encoder layers' K + V of 512."""
    cfg = flow.config
    real = dataclasses.replace(
        cfg, estimator=dataclasses.replace(cfg.estimator, channels=(256,), attention_head_dim=64, num_heads=8,
                                           n_blocks=4, num_mid_blocks=12),
        encoder=dataclasses.replace(cfg.encoder, num_blocks=6, num_up_blocks=4, output_size=512))
    values = 10 * 2 * 56 * 2 * 512 + 2 * 512 * (6 / 2 + 4)
    assert cache_bytes_per_frame(real, torch.float16) == int(values * 2)
    assert cache_bytes_per_frame(real, torch.float32) == int(values * 4)


def test_nbytes_is_bounded_by_the_per_frame_budget(flow: CosyVoice2Flow) -> None:
    prompt, tokens = random_prompt(flow, PROMPT_TOKENS), random_tokens(flow, 203)
    stream = FlowStream(flow, *prompt)
    stream.advance(tokens)
    frames = 2 * stream.committed
    per_frame = cache_bytes_per_frame(flow.config, torch.float32)
    assert per_frame * frames <= stream.nbytes() <= 2 * per_frame * frames + (1 << 20)  # buffers grow by doubling


def benchmark(model_dir: Path, n_tokens: int = N_TOKENS, hop: int = HOP, repeats: int = 3) -> None:
    """Per-chunk flow time along one utterance: upstream's recompute of everything vs the incremental stream
    (fast final). Best of `repeats` runs per call (the incremental one on forks of the same state), wall and
    process CPU time, so that other load on the machine disturbs the comparison less."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    flow = CosyVoice2Flow.from_pretrained(model_dir)
    prompt, tokens = random_prompt(flow, 102), random_tokens(flow, n_tokens)
    stream = FlowStream(flow, *prompt, exact_final=False)
    flow.inference(tokens[None, :60], *prompt, streaming=True, finalize=False)  # warm-up

    def best(run):  # -> (result, wall ms, cpu ms), each the minimum over the repeats
        results = []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            out = run()
            results.append((out, 1000 * (time.perf_counter() - wall), 1000 * (time.process_time() - cpu)))
        return results[-1][0], min(r[1] for r in results), min(r[2] for r in results)

    print(f"{'call':>4} {'tokens':>6} {'frames':>6}   recompute wall/cpu ms   incremental wall/cpu ms  max diff")
    offset = pushed = 0
    for call, end in enumerate(hop_schedule(102, n_tokens, hop) + [n_tokens]):
        final = end == n_tokens
        n = end if final else end + 3
        reference, ref_wall, ref_cpu = best(lambda: flow.inference(tokens[None, :n], *prompt, streaming=True,
                                                                   finalize=final)[:, :, 2 * offset:])
        forks = [stream.fork() for _ in range(repeats)]
        next_fork = iter(forks)
        mel, inc_wall, inc_cpu = best(lambda: next(next_fork).advance(tokens[pushed:n], finalize=final))
        stream = forks[-1]
        print(f"{call:>4} {end:>6} {mel.size(2):>6}   {ref_wall:>10.0f} / {ref_cpu:<10.0f}   {inc_wall:>10.0f} / "
              f"{inc_cpu:<10.0f}   {max_diff(mel, reference):.1e}{'  (final)' if final else ''}")
        offset, pushed = end, n


if __name__ == "__main__":
    benchmark(benchmark_model_dir(sys.argv), int(sys.argv[2]) if len(sys.argv) > 2 else N_TOKENS)


def test_reserved_position_tables_give_the_same_projections(tiny_cosyvoice2_dir: Path) -> None:
    """Tables computed up front (reserve_positions) hold the values growing on demand gives, and cover the
    reserved length at both rates, so no stream pays for growing them."""
    grown, reserved = (CosyVoice2Flow.from_pretrained(tiny_cosyvoice2_dir).encoder for _ in range(2))
    reserved.reserve_positions(300)
    for grown_layer, reserved_layer, rate in [(grown.encoders[0], reserved.encoders[0], 1),
                                              (grown.up_encoders[-1], reserved.up_encoders[-1], 2)]:
        table = reserved_layer.self_attn._projected_positions
        assert table.size(2) >= 2 * 300 * rate - 1
        on_demand = grown_layer.self_attn.projected_offsets(40, -7)
        torch.testing.assert_close(reserved_layer.self_attn.projected_offsets(40, -7), on_demand)
        assert reserved_layer.self_attn._projected_positions is table  # big enough already: not regrown
