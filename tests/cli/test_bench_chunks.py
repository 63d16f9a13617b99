"""`cosyapp bench engine --long-tokens N`: the chunk profile of one long streaming request (flow and vocoder
time of every chunk along the utterance), on the tiny model through the CLI, and the table it is built from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cosyapp.bench
from cosyapp.bench import chunk_profile, format_chunk_profile

# 25 + 50 tokens, then 100-token hops: 430 tokens stream three of them before the final call.
LONG_TOKENS = 430
FULL_HOP = 100


def test_long_request_is_profiled_chunk_by_chunk(cli, tiny_cosyvoice2_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    loaded_with: list[dict] = []
    real_load_backend = cosyapp.bench.load_backend

    def recording_load_backend(*args, **kwargs):
        loaded_with.append(kwargs)
        return real_load_backend(*args, **kwargs)

    monkeypatch.setattr(cosyapp.bench, "load_backend", recording_load_backend)
    out = tmp_path / "bench.json"
    result = cli("bench", "engine", "--model-dir", str(tiny_cosyvoice2_dir), "--device", "cpu", "--runs", "1",
                 "--tokens", "20", "--long-tokens", str(LONG_TOKENS), "--flow-left-chunks", "2", "--json", str(out))
    report = json.loads(out.read_text())

    assert loaded_with[0]["flow_left_chunks"] == 2
    assert report["backend_options"] == {"flow_left_chunks": 2}
    profile = report["chunk_profile"]
    chunks = profile["chunks"]
    assert profile["tokens"] == LONG_TOKENS
    assert [chunk["index"] for chunk in chunks] == list(range(1, len(chunks) + 1))
    # The chunks tile the utterance: each starts where the previous ended, from token 0 to the last one.
    assert chunks[0]["start_token"] == 0 and chunks[-1]["end_token"] == pytest.approx(LONG_TOKENS)
    for previous, chunk in zip(chunks, chunks[1:]):
        assert chunk["start_token"] == pytest.approx(previous["end_token"])
        assert chunk["tokens"] == pytest.approx(chunk["end_token"] - chunk["start_token"], abs=0.02)
    assert [chunk["final"] for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    # The hop doubles from 25 (plus the prompt's pad) to 100 and stays there until the final call.
    assert chunks[1]["tokens"] == 50
    middle = chunks[2:-1]
    assert len(middle) == 3 and all(chunk["tokens"] == FULL_HOP for chunk in middle)
    assert profile["full_hop_tokens"] == FULL_HOP
    assert profile["full_hop_indices"] == [chunk["index"] for chunk in middle]
    for chunk in chunks:
        assert chunk["flow_ms"] > 0 and chunk["vocoder_ms"] > 0
    assert profile["first_full_hop_flow_ms"] == middle[0]["flow_ms"]
    assert profile["last_full_hop_flow_ms"] == middle[-1]["flow_ms"]
    assert profile["flow_ratio"] == pytest.approx(middle[-1]["flow_ms"] / middle[0]["flow_ms"])
    assert profile["audio_s"] == pytest.approx(LONG_TOKENS / 25)  # 25 speech tokens per second of audio

    assert "backend options: flow_left_chunks=2" in result.output
    # The decode-step comparison: every fixed batch size up to the backend's streams, both steps timed.
    decode = report["decode_step"]
    assert decode["fixed_step"].startswith("fixed shapes, eager")  # --device cpu: no CUDA graphs
    assert [int(size) for size in decode["steps"]] == sorted(int(size) for size in decode["steps"])
    assert all(times["eager_ms"] > 0 and times["fixed_ms"] > 0 for times in decode["steps"].values())
    assert "LM decode step at position" in result.output
    assert f"chunk profile: one streaming request of {LONG_TOKENS} LM tokens" in result.output
    assert (f"first 100-token hop (chunk 3) {middle[0]['flow_ms']:.2f} ms, last 100-token hop (chunk 5) "
            f"{middle[-1]['flow_ms']:.2f} ms, ratio {profile['flow_ratio']:.2f}") in result.output


def test_profile_compares_the_first_and_last_hop_of_the_full_size() -> None:
    per_token = 960  # samples per token at 24 kHz
    hops = [21, 50, 100, 100, 100, 100, 59]
    flow_s = [0.010, 0.020, 0.040, 0.041, 0.050, 0.060, 0.030]
    vocoder_s = [0.005, 0.006, 0.008, 0.008, 0.008, 0.012, 0.007]
    profile = chunk_profile([hop * per_token for hop in hops], flow_s, vocoder_s, tokens=sum(hops),
                            sample_rate=24000, elapsed_s=2.0)

    assert [chunk["tokens"] for chunk in profile["chunks"]] == hops
    assert [chunk["start_token"] for chunk in profile["chunks"]] == [0, 21, 71, 171, 271, 371, 471]
    assert profile["full_hop_indices"] == [3, 4, 5, 6]
    assert profile["first_full_hop_flow_ms"] == pytest.approx(40.0)
    assert profile["last_full_hop_flow_ms"] == pytest.approx(60.0)
    assert profile["flow_ratio"] == pytest.approx(1.5)
    assert profile["vocoder_ratio"] == pytest.approx(1.5)
    assert profile["audio_s"] == pytest.approx(530 / 25) and profile["rtf"] == pytest.approx(2.0 / (530 / 25))
    text = format_chunk_profile(profile)
    assert "first 100-token hop (chunk 3) 40.00 ms, last 100-token hop (chunk 6) 60.00 ms, ratio 1.50" in text
    final_rows = [line.split() for line in text.splitlines() if line.endswith("final call")]
    assert len(final_rows) == 1 and final_rows[0][:2] == ["7", "59"]


def test_profile_without_two_full_hops_has_no_ratio() -> None:
    hops = [21, 50, 30]
    profile = chunk_profile([hop * 960 for hop in hops], [0.01, 0.02, 0.03], [0.01, 0.01, 0.01], tokens=101,
                            sample_rate=24000, elapsed_s=1.0)
    assert profile["full_hop_indices"] == [2] and profile["flow_ratio"] is None
    assert "fewer than two hops of the full size" in format_chunk_profile(profile)


def test_profile_needs_one_flow_and_vocoder_call_per_chunk() -> None:
    with pytest.raises(ValueError, match="one flow and one vocoder call per chunk"):
        chunk_profile([960, 960], [0.01], [0.01, 0.01], tokens=2, sample_rate=24000, elapsed_s=1.0)


def test_flow_left_chunks_is_a_cosyvoice_option(cli) -> None:
    result = cli("bench", "engine", "--backend", "fish", "--flow-left-chunks", "2", expect_ok=False)
    assert result.exit_code == 2 and "only the CosyVoice backends have this option" in result.output


def test_cosyvoice3_long_request_is_profiled(cli, tiny_cosyvoice3_dir: Path, tmp_path: Path) -> None:
    """CosyVoice3 times every chunk's flow and vocoder calls too, with its own flow_left_chunks option."""
    out = tmp_path / "bench.json"
    cli("bench", "engine", "--backend", "cosyvoice3", "--model-dir", str(tiny_cosyvoice3_dir), "--device", "cpu",
        "--runs", "1", "--tokens", "20", "--long-tokens", str(LONG_TOKENS), "--flow-left-chunks", "1",
        "--json", str(out))
    report = json.loads(out.read_text())
    assert report["backend_options"] == {"flow_left_chunks": 1}
    profile = report["chunk_profile"]
    assert profile["full_hop_tokens"] == FULL_HOP and len(profile["full_hop_indices"]) == 3
    assert all(chunk["flow_ms"] > 0 and chunk["vocoder_ms"] > 0 for chunk in profile["chunks"])
    assert profile["audio_s"] == pytest.approx(LONG_TOKENS / 25)
