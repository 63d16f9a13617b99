"""The service load benchmark (issue 5) against a real service on the tiny model, started by the benchmark's own
launcher: report structure and internal consistency (no timing asserts), the underrun model, the CLI, and
the `fixed_length` form field it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from cosyapp.bench_service import LoadPlan, LocalService, Playback, format_service_report, run_service_bench, \
    start_local_service
from cosyapp.cli import main
from service_live import REPO_ROOT

SECONDS_PER_TOKEN = 0.04  # 25 speech tokens per second of CosyVoice2 audio
FIXED_LENGTH = 30
PLAN = LoadPlan(fixed_length=FIXED_LENGTH, levels=(1, 2), requests_per_client=2, poisson_rate=4.0,
                poisson_requests=4)


@pytest.fixture(scope="module")
def bench_url(tiny_cosyvoice2_dir: Path) -> str:
    service = LocalService(config=REPO_ROOT / "config.toml", model_dir=tiny_cosyvoice2_dir, device="cpu",
                           max_concurrent=2, max_queue=4)
    with start_local_service(service, PLAN) as running:
        yield running.url


def test_playback_counts_each_late_chunk_once() -> None:
    playback = Playback(bytes_per_s=48000)  # 24 kHz s16le mono
    playback.arrive(0.0, 24000)  # 0.5 s of audio: plays until 0.5
    playback.arrive(0.3, 24000)  # in time: plays until 1.0
    playback.arrive(1.2, 12000)  # 0.2 s late: an underrun, plays on until 1.45
    playback.arrive(1.2001, 12000)  # the rest of the same chunk: in time, until 1.7
    playback.arrive(1.6, 4800)
    assert playback.underruns == 1
    assert playback.stall_s == pytest.approx(0.2)
    assert playback.plays_until == pytest.approx(1.8)


def test_report_is_consistent(bench_url: str) -> None:
    report = run_service_bench(PLAN, url=bench_url)
    json.dumps(report)  # what --json writes
    assert report["started_service"] is False and report["plan"]["fixed_length"] == FIXED_LENGTH
    assert report["model_info"]["model_type"] == "CosyVoice2"
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    poisson = report["poisson"]
    assert poisson["kind"] == "poisson" and poisson["rate_per_s"] == 4.0
    per_request_s = FIXED_LENGTH * SECONDS_PER_TOKEN  # the text is one sentence
    for row, expected_requests in zip(report["levels"] + [poisson], [2, 4, 4]):
        assert row["requests"] == row["ok"] == len(row["results"]) == expected_requests, row["errors"]
        assert row["rejected"] == row["failed"] == 0
        for result in row["results"]:
            assert result["audio_s"] == pytest.approx(per_request_s, abs=1e-9)
            assert 0 < result["first_audio_s"] <= result["total_s"]
            assert result["underruns"] >= 0 and result["stall_s"] >= 0
            assert (result["underruns"] == 0) == (result["stall_s"] == 0)
        assert row["audio_s_total"] == pytest.approx(per_request_s * expected_requests, abs=1e-9)
        assert row["audio_s_per_s"] == pytest.approx(row["audio_s_total"] / row["wall_s"])
        first, total = row["first_audio_s"], row["total_s"]
        assert 0 < first["p50"] <= first["p95"] <= first["p99"] <= max(r["first_audio_s"] for r in row["results"])
        assert total["p50"] <= total["p95"] <= total["p99"]
        assert row["rtf_median"] > 0
        assert row["underruns_total"] == sum(r["underruns"] for r in row["results"]) >= 0
        assert 0 <= row["requests_with_underruns"] <= row["ok"]
        assert row["wall_s"] >= max(r["total_s"] for r in row["results"])
        assert set(row["cpu_cores"]) == {"service", "client", "other"}
    # The service counted what the benchmark sent (warm-up included) and saw no rejections.
    stats = report["service_stats"]
    assert stats["completed"] >= 1 + 2 + 4 + 4 and stats["rejected"] == 0
    table = format_service_report(report)
    assert "c1 " in table and "c2 " in table and "poisson 4/s" in table


def test_cli_writes_the_json_report(bench_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "service", "--url", bench_url, "--levels", "1", "--requests", "1",
                                       "--fixed-length", "20", "--poisson-rate", "0", "--warmup", "0",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["poisson"] is None and report["levels"][0]["ok"] == 1
    assert report["levels"][0]["audio_s_total"] == pytest.approx(20 * SECONDS_PER_TOKEN, abs=1e-9)
    assert "c1 " in result.output


def test_cli_names_an_unreachable_service() -> None:
    result = CliRunner().invoke(main, ["bench", "service", "--url", "http://127.0.0.1:9", "--levels", "1"])
    assert result.exit_code == 1 and "cannot get http://127.0.0.1:9/model_info" in result.output


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", "4097", "9" * 40])
def test_fixed_length_out_of_range_is_a_400(bench_url: str, value: str) -> None:
    response = httpx.post(f"{bench_url}/synthesize", data={"text": "Hello.", "fixed_length": value}, timeout=60,
                          trust_env=False)
    assert response.status_code == 400
    assert "fixed_length must be a whole number of LM tokens from 1 to 4096" in response.json()["detail"]
