"""Parity of the incremental streaming flow (flow_stream.py) with upstream's recomputing calls, on the
tiny golden model: driven through the golden streaming schedule, each call's NEW frames must equal the
matching frames of upstream's `stream_call*_mel`; the chunked waveforms of stream.npz must still match when
token2wav uses it.

Tolerances (golden README 5): mels 1e-4 abs, waveforms 1e-3 abs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.flow_stream import FlowStream, RecomputeFlowStream
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator
from cosyapp.backends.cosyvoice2.token2wav import Token2Wav

MEL_ATOL = 1e-4
WAVE_ATOL = 1e-3


@pytest.fixture(scope="module")
def golden(cosyvoice2_golden: Path) -> dict[str, np.ndarray]:
    with np.load(cosyvoice2_golden / "flow.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def stream_golden(cosyvoice2_golden: Path) -> dict[str, np.ndarray]:
    with np.load(cosyvoice2_golden / "stream.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def flow(cosyvoice2_golden: Path, config: CosyVoice2Config) -> CosyVoice2Flow:
    torch.set_num_threads(2)
    return CosyVoice2Flow.from_pretrained(cosyvoice2_golden / "tiny", config)


def prompt(golden: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(golden["prompt_token"])[None], torch.from_numpy(golden["prompt_feat"])[None],
            torch.from_numpy(golden["embedding"])[None])


def assert_close(actual: torch.Tensor, expected: np.ndarray, atol: float, what: str) -> None:
    actual_np = actual.detach().float().cpu().numpy()
    assert actual_np.shape == expected.shape, f"{what}: shape {actual_np.shape} != golden {expected.shape}"
    diff = float(np.abs(actual_np - expected).max())
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol:g}"


def drive_golden_schedule(stream: FlowStream | RecomputeFlowStream,
                          golden: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """The calls upstream made (stream_call_token_len / _finalize), each passing only the new tokens."""
    tokens = torch.from_numpy(golden["tokens"])
    mels, pushed = [], 0
    for token_len, finalize in zip(golden["stream_call_token_len"], golden["stream_call_finalize"]):
        mels.append(stream.advance(tokens[pushed:int(token_len)], finalize=bool(finalize)))
        pushed = int(token_len)
    return mels


def expected_new_frames(golden: dict[str, np.ndarray], call: int) -> np.ndarray:
    """stream_call{call}_mel from the frames of the previous call's offset on (what token2wav keeps)."""
    return golden[f"stream_call{call}_mel"][:, 2 * int(golden["stream_call_token_offset"][call]):]


@pytest.mark.parametrize("prefill", [False, True], ids=["from-scratch", "prefilled-prompt"])
def test_incremental_calls_match_upstream_exact_final(flow: CosyVoice2Flow, golden: dict[str, np.ndarray],
                                                      settings: dict, prefill: bool) -> None:
    stream = FlowStream(flow, *prompt(golden), exact_final=True)
    if prefill:
        stream.prefill_prompt()
        # Whole chunks only, and the next chunk would need look-ahead tokens past the end of the prompt.
        chunk = settings["encoder_static_chunk_size"]
        prompt_tokens = len(golden["prompt_token"])
        assert stream.committed == (prompt_tokens - settings["pre_lookahead_len"]) // chunk * chunk
        stream = stream.fork()
    mels = drive_golden_schedule(stream, golden)
    assert len(mels) == len(golden["stream_call_token_len"])
    for call, mel in enumerate(mels):
        assert mel.dtype == torch.float32
        assert_close(mel[0], expected_new_frames(golden, call), MEL_ATOL, f"call {call} new frames")


def test_incremental_calls_are_cached_not_recomputed(flow: CosyVoice2Flow, golden: dict[str, np.ndarray],
                                                      settings: dict) -> None:
    """The second non-final call runs the estimator on its new tokens' frames only, at every Euler step."""
    frames_seen: list[int] = []
    estimator_forward = flow.decoder.estimator.forward

    def spy(x, *args, **kwargs):
        frames_seen.append(x.size(2))
        return estimator_forward(x, *args, **kwargs)

    stream = FlowStream(flow, *prompt(golden), exact_final=True)
    tokens = torch.from_numpy(golden["tokens"])
    first, second = (int(n) for n in golden["stream_call_token_len"][:2])
    stream.advance(tokens[:first])
    flow.decoder.estimator.forward = spy
    try:
        mel = stream.advance(tokens[first:second])
    finally:
        del flow.decoder.estimator.forward
    new_frames = settings["token_mel_ratio"] * (second - first)
    assert frames_seen == [new_frames] * settings["flow"]["n_estimator_calls_per_inference"]
    assert_close(mel[0], expected_new_frames(golden, 1), MEL_ATOL, "call 1 new frames")


def test_fast_final_matches_full_sequence_chunk_masks(flow: CosyVoice2Flow, golden: dict[str, np.ndarray]) -> None:
    """exact_final=False: the final call keeps the chunk masks, so all calls together are upstream's
    full-sequence chunk-masked mel (`fullseq_streamingmask_finalize_mel`)."""
    mels = drive_golden_schedule(FlowStream(flow, *prompt(golden), exact_final=False), golden)
    for call in range(len(mels) - 1):  # the non-final calls
        assert_close(mels[call][0], expected_new_frames(golden, call), MEL_ATOL, f"call {call} new frames")
    assert_close(torch.cat(mels, dim=2)[0], golden["fullseq_streamingmask_finalize_mel"], MEL_ATOL,
                 "all frames, fast final")


def test_recompute_stream_matches_upstream(flow: CosyVoice2Flow, golden: dict[str, np.ndarray]) -> None:
    mels = drive_golden_schedule(RecomputeFlowStream(flow, *prompt(golden), exact_final=True), golden)
    for call, mel in enumerate(mels):
        assert_close(mel[0], expected_new_frames(golden, call), MEL_ATOL, f"recompute call {call}")


def test_token2wav_chunks_with_incremental_flow(cosyvoice2_golden: Path, flow: CosyVoice2Flow, config: CosyVoice2Config,
                                                golden: dict[str, np.ndarray],
                                                stream_golden: dict[str, np.ndarray]) -> None:
    hift = HiFTGenerator.from_pretrained(cosyvoice2_golden / "tiny", config)
    t2w = Token2Wav(flow, hift, config, random_source=False, incremental_flow=True, exact_final=True)
    session = t2w.new_stream(*prompt(golden))
    assert isinstance(session.flow_stream, FlowStream)
    chunks = session.push(golden["tokens"].tolist())
    chunks.append(session.finish())
    assert [len(c) for c in chunks] == stream_golden["chunk_lengths"].tolist()
    for i, chunk in enumerate(chunks):
        assert_close(chunk, stream_golden[f"chunk{i}"], WAVE_ATOL, f"chunk {i}")
