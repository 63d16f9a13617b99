"""Quick runs of the robustness campaign's parts (`cosyapp bench robustness` runs them at full size): a small
fuzz corpus over every route and the live socket, a short disconnect storm, one kill -9 round and a short soak."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from click.testing import CliRunner
from starlette.routing import Route, WebSocketRoute

from cosyapp.cli import main
from cosyapp.config import load_settings
from cosyapp.robustness.corpus import AGENT_ENDPOINT, ROUTES, generate_corpus
from cosyapp.robustness.crashes import run_crash_rounds
from cosyapp.robustness.disconnects import run_storm
from cosyapp.robustness.fuzz import run_fuzz
from cosyapp.robustness.service import CampaignModels, codec_codebooks, settled_rss
from cosyapp.robustness.soak import run_soak
from cosyapp.server.app import create_app


def test_the_corpus_is_reproducible_and_covers_every_route():
    cases = generate_corpus(400, 7, 10)
    assert cases == generate_corpus(400, 7, 10)
    assert {case.label for case in cases} == set(ROUTES)


def test_the_corpus_knows_every_route_of_the_service():
    """A route added to the service without a place in the corpus would go unfuzzed: this names it. (The
    playground's static files are a mount, not a route with a body or parameters.)"""
    app_routes = {route.path for route in create_app(load_settings(None)).routes
                  if isinstance(route, (Route, WebSocketRoute))}
    as_corpus_names = {re.sub(r"\{\w+\}", "{id}", path.replace("/v2/{endpoint_id}", AGENT_ENDPOINT))
                       for path in app_routes}
    assert as_corpus_names - set(ROUTES) == set()


def test_a_small_fuzz_run_gets_no_500_and_no_hang_and_gives_its_memory_back(robust_service):
    cases = generate_corpus(150, 1, codec_codebooks(robust_service.url))
    before = settled_rss(robust_service.url, robust_service.pid)
    result = asyncio.run(run_fuzz(robust_service.url, cases, concurrency=6, hang_s=60))
    assert result.cases == 150 and result.live_sessions > 0
    assert not result.server_errors and not result.hangs, (result.server_errors, result.hangs)
    assert result.statuses[400] > 0
    assert settled_rss(robust_service.url, robust_service.pid) - before < 500


def test_a_disconnect_storm_leaves_nothing_in_flight(robust_service):
    result = asyncio.run(run_storm(robust_service.url, robust_service.port, 24, concurrency=8, seed=3))
    assert result.disconnects == 24 and result.before_answer > 0
    assert result.idle, f"in flight {result.idle_after_s:.2f} s after the storm: {result.final_stats}"


def test_a_kill_round_loses_nothing_acknowledged(campaign_models: CampaignModels, tmp_path: Path):
    result = asyncio.run(run_crash_rounds(campaign_models, tmp_path, rounds=1, max_kill_after_s=3.0))
    assert result.rounds == 1 and result.voices_acknowledged + result.tasks_acknowledged > 0
    assert not result.lost, result.lost


def test_a_short_soak_reports_its_memory(robust_service):
    result = asyncio.run(run_soak(robust_service.url, robust_service.pid, 12, codec_codebooks(robust_service.url)))
    assert result.requests > 0 and result.failures == 0
    assert len(result.samples) >= 2 and result.end_rss_mb > 0


def test_the_command_prints_the_figures(tmp_path: Path, campaign_models: CampaignModels):
    models = tmp_path / "models"
    for name, path in (("cosyvoice2", campaign_models.cosyvoice2), ("fish", campaign_models.fish)):
        (models / name).parent.mkdir(exist_ok=True)
        (models / name).symlink_to(path)
        (models / f".{name}.complete").touch()
    result = CliRunner().invoke(main, ["bench", "robustness", "--only", "disconnects", "--disconnects", "10",
                                       "--models", str(models)])
    assert result.exit_code == 0, result.output
    assert "disconnect storm: 10 disconnects" in result.output and "OK" in result.output
