"""The robustness campaign behind `cosyapp bench robustness`: fuzz, disconnect storm, kill -9 rounds and soak,
each against a service started for it (tiny random models unless given real ones), with its figures and whether
each meets the service's promise:

- fuzz: no answer 500, no hang, /health p99 under 0.5 s while it runs, RSS back within 500 MB of the start;
- disconnect storm: nothing in flight 1 s after the last disconnect;
- kill -9 rounds: no acknowledged voice or task lost;
- soak: RSS at the end within 5 % of its value after the warm-up.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cosyapp.robustness.corpus import ROUTES, generate_corpus
from cosyapp.robustness.crashes import run_crash_rounds
from cosyapp.robustness.disconnects import run_storm
from cosyapp.robustness.fuzz import run_fuzz
from cosyapp.robustness.service import CampaignModels, campaign_service, codec_codebooks, settled_rss
from cosyapp.robustness.soak import run_soak

PARTS = ("fuzz", "disconnects", "crashes", "soak")
HEALTH_P99_LIMIT_S = 0.5
FUZZ_RSS_LIMIT_MB = 500.0
IDLE_WITHIN_S = 1.0
SOAK_CHANGE_LIMIT_PERCENT = 5.0


@dataclass(frozen=True)
class CampaignPlan:
    fuzz_cases: int = 5000
    disconnects: int = 200
    kill_rounds: int = 20
    soak_minutes: float = 10.0
    parts: tuple[str, ...] = PARTS
    seed: int = 0
    concurrency: int = 8


def _fuzz_and_storm(plan: CampaignPlan, models: CampaignModels, workdir: Path, report: dict[str, Any]) -> None:
    with campaign_service(models, workdir / "fuzz") as service:
        codebooks = codec_codebooks(service.url)
        if "fuzz" in plan.parts:
            started = time.perf_counter()
            cases = generate_corpus(plan.fuzz_cases, plan.seed, codebooks)
            generation_s = time.perf_counter() - started
            before = settled_rss(service.url, service.pid)
            fuzz = asyncio.run(run_fuzz(service.url, cases, plan.concurrency))
            after = settled_rss(service.url, service.pid)
            server_errors = len(fuzz.server_errors)
            report["fuzz"] = {
                "cases": fuzz.cases, "live_sessions": fuzz.live_sessions, "routes": len(fuzz.routes),
                "routes_in_corpus": len(ROUTES), "statuses": dict(sorted(fuzz.statuses.items())),
                "server_errors": server_errors, "server_error_examples": fuzz.server_errors[:5],
                "hangs": len(fuzz.hangs), "hang_examples": fuzz.hangs[:5],
                "health_p99_s": round(fuzz.health_p99_s, 3), "health_failures": fuzz.health_failures,
                "rss_before_mb": round(before), "rss_after_mb": round(after), "rss_growth_mb": round(after - before),
                "seconds": round(fuzz.seconds, 1), "generation_seconds": round(generation_s, 1),
                "ok": (fuzz.cases >= plan.fuzz_cases and server_errors == 0 and not fuzz.hangs
                       and fuzz.health_p99_s < HEALTH_P99_LIMIT_S and after - before <= FUZZ_RSS_LIMIT_MB),
            }
        if "disconnects" in plan.parts:
            before = settled_rss(service.url, service.pid)
            storm = asyncio.run(run_storm(service.url, service.port, plan.disconnects, seed=plan.seed,
                                          idle_within_s=IDLE_WITHIN_S))
            after = settled_rss(service.url, service.pid)
            report["disconnects"] = {
                "disconnects": storm.disconnects, "kinds": dict(storm.kinds), "before_answer": storm.before_answer,
                "in_flight_zero_after_s": round(storm.idle_after_s, 3), "final_stats": storm.final_stats,
                "rss_before_mb": round(before), "rss_after_mb": round(after), "seconds": round(storm.seconds, 1),
                "ok": storm.disconnects >= plan.disconnects and storm.idle,
            }


def run_campaign(plan: CampaignPlan, models_dir: Path | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """Run the plan's parts; the report (per part its figures and "ok")."""
    report: dict[str, Any] = {"plan": asdict(plan)}
    with tempfile.TemporaryDirectory(prefix="cosyapp-robustness-") as scratch:
        workdir = workdir or Path(scratch)
        models = CampaignModels.tiny(models_dir or workdir / "models")
        if {"fuzz", "disconnects"} & set(plan.parts):
            _fuzz_and_storm(plan, models, workdir, report)
        if "crashes" in plan.parts:
            crashes = asyncio.run(run_crash_rounds(models, workdir / "crashes", plan.kill_rounds, plan.seed))
            report["crashes"] = {**asdict(crashes), "seconds": round(crashes.seconds, 1),
                                 "ok": crashes.rounds == plan.kill_rounds and not crashes.lost}
        if "soak" in plan.parts:
            with campaign_service(models, workdir / "soak") as service:
                soak = asyncio.run(run_soak(service.url, service.pid, plan.soak_minutes * 60,
                                            codec_codebooks(service.url)))
            report["soak"] = {
                "seconds": round(soak.seconds), "requests": soak.requests, "failures": soak.failures,
                "warm_rss_mb": round(soak.warm_rss_mb, 1), "end_rss_mb": round(soak.end_rss_mb, 1),
                "change_percent": round(soak.change_percent, 2), "slope_mb_per_min": round(soak.slope_mb_per_min, 2),
                "ok": abs(soak.change_percent) <= SOAK_CHANGE_LIMIT_PERCENT and soak.failures == 0,
            }
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = []
    if "fuzz" in report:
        f = report["fuzz"]
        lines += [f"fuzz: {f['cases']} cases ({f['live_sessions']} live sessions) over {f['routes']} routes in "
                  f"{f['seconds']} s; answers by status {f['statuses']}",
                  f"  500s {f['server_errors']}, hangs {f['hangs']}, /health p99 {f['health_p99_s']} s "
                  f"({f['health_failures']} failed), RSS {f['rss_before_mb']} -> {f['rss_after_mb']} MB "
                  f"({f['rss_growth_mb']:+} MB)  {'OK' if f['ok'] else 'FAILED'}"]
        lines += [f"  500: {example}" for example in f["server_error_examples"]]
        lines += [f"  hang: {example}" for example in f["hang_examples"]]
    if "disconnects" in report:
        d = report["disconnects"]
        lines.append(f"disconnect storm: {d['disconnects']} disconnects {d['kinds']}, {d['before_answer']} before "
                     f"the answer started; in_flight 0 after {d['in_flight_zero_after_s']} s; RSS "
                     f"{d['rss_before_mb']} -> {d['rss_after_mb']} MB  {'OK' if d['ok'] else 'FAILED'}")
    if "crashes" in report:
        c = report["crashes"]
        lines.append(f"kill -9: {c['rounds']} rounds, {c['voices_acknowledged']} voices and {c['tasks_acknowledged']} "
                     f"tasks acknowledged ({c['tasks_completed']} completed), lost {len(c['lost'])}  "
                     f"{'OK' if c['ok'] else 'FAILED'}")
        lines += [f"  lost: {what}" for what in c["lost"][:10]]
    if "soak" in report:
        s = report["soak"]
        lines.append(f"soak: {s['seconds']} s, {s['requests']} requests ({s['failures']} failed); RSS "
                     f"{s['warm_rss_mb']} MB after warm-up -> {s['end_rss_mb']} MB at the end "
                     f"({s['change_percent']:+.2f} %), slope {s['slope_mb_per_min']:+.2f} MB/min  "
                     f"{'OK' if s['ok'] else 'FAILED'}")
    return "\n".join(lines)


def campaign_ok(report: dict[str, Any]) -> bool:
    return all(report[part]["ok"] for part in PARTS if part in report)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))
