"""Streaming token-to-wave schedule parity against the upstream goldens (`stream.npz`, golden README 5.5).

The schedule tests drive `Token2Wav` with a fake flow that checks every call against `stream_call_*`
(flow.npz) and settings.json `stream.calls`, and returns upstream's recorded flow mel for it; HiFT is
the real one, with zero randomness (the goldens' patched mode). The end-to-end test uses the real flow.

Tolerances (README 5): mels 1e-4 abs, waveforms 1e-3 abs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.flow import CosyVoice2Flow
from cosyapp.backends.cosyvoice2.hift import HiFTGenerator
from cosyapp.backends.cosyvoice2.token2wav import Token2Wav, prompt_token_pad

MEL_TOL = 1e-4
WAVE_TOL = 1e-3


@dataclass
class Golden:
    stream: dict[str, np.ndarray]
    flow: dict[str, np.ndarray]
    settings: dict

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.flow["prompt_token"])[None],
                torch.from_numpy(self.flow["prompt_feat"])[None],
                torch.from_numpy(self.flow["embedding"])[None])

    def tokens(self) -> torch.Tensor:
        return torch.from_numpy(self.flow["tokens"])


@pytest.fixture(scope="module")
def golden(cosyvoice2_golden: Path) -> Golden:
    return Golden(dict(np.load(cosyvoice2_golden / "stream.npz")), dict(np.load(cosyvoice2_golden / "flow.npz")),
                  json.loads((cosyvoice2_golden / "settings.json").read_text(encoding="utf-8")))


class ReplayFlow:
    """Checks each flow call against upstream's recorded call and returns upstream's mel for it."""

    def __init__(self, golden: Golden, expected: list[dict], mels: list[np.ndarray]) -> None:
        self.golden = golden
        self.expected = expected
        self.mels = mels
        self.calls = 0

    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool, finalize: bool) -> torch.Tensor:
        assert self.calls < len(self.expected), "more flow calls than upstream made"
        call = self.expected[self.calls]
        n = call["token_len"]
        assert token.shape == (1, n), f"call {self.calls}: tokens {tuple(token.shape)}, upstream passed {n}"
        assert torch.equal(token[0], self.golden.tokens()[:n])
        assert (streaming, finalize) == (call["flow_streaming"], call["flow_finalize"]), f"call {self.calls} flags"
        for got, want in zip((prompt_token, prompt_feat, embedding), self.golden.prompt()):
            assert torch.equal(got, want)
        mel = torch.from_numpy(self.mels[self.calls])[None]
        self.calls += 1
        return mel


class RecordingHift:
    """Passes through to the real HiFT and records what each call saw and returned."""

    def __init__(self, hift: HiFTGenerator) -> None:
        self.hift = hift
        self.mels: list[torch.Tensor] = []
        self.cache_lens: list[int] = []
        self.speech: list[torch.Tensor] = []

    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        speech, source = self.hift.inference(mel, cache_source, generator)
        self.mels.append(mel)
        self.cache_lens.append(0 if cache_source is None else cache_source.shape[2])
        self.speech.append(speech)
        return speech, source


def streaming_replay(golden: Golden) -> ReplayFlow:
    calls = golden.settings["stream"]["calls"]
    flow_calls = [{"token_len": int(n), "token_offset": int(o), "flow_streaming": bool(s), "flow_finalize": bool(f)}
                  for n, o, s, f in zip(golden.flow["stream_call_token_len"], golden.flow["stream_call_token_offset"],
                                        golden.flow["stream_call_streaming"], golden.flow["stream_call_finalize"])]
    for ours, theirs in zip(flow_calls, calls):  # the two records of the schedule agree
        assert all(ours[k] == theirs[k] for k in ours), (ours, theirs)
    return ReplayFlow(golden, calls, [golden.flow[f"stream_call{i}_mel"] for i in range(len(calls))])


def assert_close(actual: torch.Tensor, expected: np.ndarray, tol: float, what: str) -> None:
    actual_np = actual.detach().cpu().numpy()
    assert actual_np.shape == expected.shape, f"{what}: shape {actual_np.shape} != golden {expected.shape}"
    err = float(np.abs(actual_np - expected).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


def run_stream(t2w: Token2Wav, golden: Golden, push_sizes: list[int]) -> list[torch.Tensor]:
    session = t2w.new_stream(*golden.prompt())
    tokens = golden.tokens().tolist()
    chunks: list[torch.Tensor] = []
    start = 0
    for size in push_sizes:
        chunks += session.push(tokens[start:start + size])
        start += size
    assert start == len(tokens)
    chunks.append(session.finish())
    return chunks


def test_constants(golden: Golden, config: CosyVoice2Config) -> None:
    stream = golden.settings["stream"]
    assert prompt_token_pad(stream["prompt_token_len"], config.chunk_size) == int(golden.stream["prompt_token_pad"])
    window = Token2Wav(None, None, config).fade_window(torch.device("cpu"))
    assert window.dtype == torch.float64
    assert np.array_equal(window.numpy().astype(np.float32), golden.stream["speech_window"])


def test_streaming_schedule_and_chunks(golden: Golden, config: CosyVoice2Config, hift: HiFTGenerator) -> None:
    flow, spy = streaming_replay(golden), RecordingHift(hift)
    chunks = run_stream(Token2Wav(flow, spy, config, random_source=False), golden, [len(golden.flow["tokens"])])
    calls = golden.settings["stream"]["calls"]
    assert flow.calls == len(calls)
    assert spy.cache_lens == [c["hift_cache_source_len"] for c in calls]
    for i in range(len(calls)):
        assert_close(spy.mels[i][0], golden.stream[f"call{i}_hift_in_mel"], MEL_TOL, f"call {i} HiFT input mel")
        assert_close(spy.speech[i][0], golden.stream[f"call{i}_hift_out_speech"], WAVE_TOL, f"call {i} HiFT speech")
    assert [len(c) for c in chunks] == golden.stream["chunk_lengths"].tolist()
    assert [len(c) for c in chunks] == [c["out_len"] for c in calls]
    for i, chunk in enumerate(chunks):
        assert chunk.dtype == torch.float32
        assert_close(chunk, golden.stream[f"chunk{i}"], WAVE_TOL, f"chunk {i}")


def test_schedule_does_not_depend_on_push_sizes_or_earlier_streams(golden: Golden, config: CosyVoice2Config,
                                                                    hift: HiFTGenerator) -> None:
    n = len(golden.flow["tokens"])
    reference = run_stream(Token2Wav(streaming_replay(golden), hift, config, random_source=False), golden, [n])
    # One token at a time, like the LLM produces them; then a second stream on the same Token2Wav, which
    # upstream would start with the grown hop, token_max_hop_len (its token_hop_len bug), pushed unevenly.
    t2w = Token2Wav(streaming_replay(golden), hift, config, random_source=False)
    one_by_one = run_stream(t2w, golden, [1] * n)
    t2w.flow = streaming_replay(golden)
    uneven = run_stream(t2w, golden, [n // 15, n // 2, 0, n - n // 15 - n // 2])
    for run in (one_by_one, uneven):
        assert len(run) == len(reference)
        for ours, ref in zip(run, reference):
            assert torch.equal(ours, ref)


def test_nonstream(golden: Golden, config: CosyVoice2Config, hift: HiFTGenerator) -> None:
    assert golden.settings["stream"]["nonstream_flow_mel_equals_flow_npz_nonstream_mel"]
    flow = ReplayFlow(golden, golden.settings["stream"]["nonstream_calls"], [golden.flow["nonstream_mel"]])
    wav = Token2Wav(flow, hift, config, random_source=False).full(golden.tokens(), *golden.prompt())
    assert flow.calls == 1
    assert_close(wav, golden.stream["nonstream_wav"], WAVE_TOL, "non-stream wav")


def test_random_source_is_seeded_per_stream(golden: Golden, config: CosyVoice2Config, hift: HiFTGenerator) -> None:
    def full(seed: int) -> torch.Tensor:
        flow = ReplayFlow(golden, golden.settings["stream"]["nonstream_calls"], [golden.flow["nonstream_mel"]])
        return Token2Wav(flow, hift, config).full(golden.tokens(), *golden.prompt(), seed=seed)

    first, again, other = full(1), full(1), full(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Noise of std 0.003 on the harmonics moves the output by more than the golden tolerance.
    assert float((first - torch.from_numpy(golden.stream["nonstream_wav"])).abs().max()) > WAVE_TOL


def test_end_to_end_with_real_flow(cosyvoice2_golden: Path, golden: Golden, config: CosyVoice2Config,
                                   hift: HiFTGenerator) -> None:
    flow = CosyVoice2Flow.from_pretrained(cosyvoice2_golden / "tiny", config, torch.device("cpu"), torch.float32)
    t2w = Token2Wav(flow, hift, config, random_source=False)
    chunks = run_stream(t2w, golden, [len(golden.flow["tokens"])])
    assert [len(c) for c in chunks] == golden.stream["chunk_lengths"].tolist()
    for i, chunk in enumerate(chunks):
        assert_close(chunk, golden.stream[f"chunk{i}"], WAVE_TOL, f"chunk {i}")
    wav = t2w.full(golden.tokens(), *golden.prompt())
    assert_close(wav, golden.stream["nonstream_wav"], WAVE_TOL, "non-stream wav")
