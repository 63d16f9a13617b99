"""Service load benchmark: many concurrent streaming requests against the real HTTP service.

Runs (each request is a plain POST /synthesize with `text` and `fixed_length`, read as a stream):
- closed loop at each concurrency level C: C clients each send `requests_per_client` requests back to back;
- open loop: requests arrive as a Poisson process at `poisson_rate` per second, whether or not the
  earlier ones have finished (what a real service sees); 503s are counted, not retried.

Per request the client notes when each piece of the body arrives, and from that:
- first audio: seconds from sending the request to the first body byte (queueing included);
- audio seconds: body bytes / 2 / X-Sample-Rate (s16le mono, the service's wire format);
- real-time factor: request time (send to last byte) / audio seconds;
- underruns: a player that starts at the first byte and plays without pause runs dry before the next piece
  arrives. It then waits for that piece (the stall) and plays on from its arrival, so one late chunk counts
  once, however the network splits it.

`fixed_length` makes the LM ignore its stop token and produce exactly N tokens per sentence, so runs on
random weights are comparable: a one-sentence text gives N * 0.04 s of CosyVoice2 audio per request.
`run_service_bench` either starts the service itself (`python -m cosyapp serve` on a free loopback port,
with COSYAPP_* overrides) or targets the URL of a running one. Used by `cosyapp bench service` and
scripts/bench_service.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np

from cosyapp.bench import BENCH_TEXT
from cosyapp.service_process import ServiceProcess, ServiceStartError, free_port, start_service

STARTUP_TIMEOUT_S = 900.0  # loading a full-size model (and warming it up) on a CPU takes minutes
STOP_TIMEOUT_S = 30.0  # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 30  # of the service's log, quoted when it failed to start
# The open loop's default rate: this share of the best request throughput the closed-loop levels reached.
AUTO_POISSON_LOAD = 0.7


# Texts of different lengths, sent without fixed_length as real clients send them: each stream stops when its
# LM does (on random weights: at about 20 speech tokens per text token, upstream's max_len), so streams are
# out of step. One to four sentences; a sentence is synthesized after the one before.
NATURAL_TEXTS = (
    "Good morning, how can I help you today?",
    "Your table is ready. Please follow me to the window seat.",
    "The train to the airport leaves from platform four in ten minutes. Please have your ticket ready.",
    "Thanks for calling. All of our agents are busy right now, so please stay on the line.",
    "Welcome back! Your order has been shipped and should arrive on Thursday. You can track it in the app. "
    "Let us know if anything is missing.",
    "Turn left at the next corner.",
    "The weather today is sunny with a light breeze, and the temperature will reach twenty two degrees in "
    "the afternoon.",
    "Sorry, I did not catch that. Could you say it again?",
)


class BenchError(RuntimeError):
    """The benchmark could not run (service did not start, unreachable, refused the warm-up); says why."""


@dataclass(frozen=True)
class LoadPlan:
    """What to send. `poisson_rate` None: derive it from the closed-loop levels; 0: no open-loop run."""

    text: str = BENCH_TEXT
    fixed_length: int = 100
    levels: tuple[int, ...] = (1, 2, 4, 8, 16)
    requests_per_client: int = 4
    poisson_rate: float | None = None
    poisson_requests: int = 32
    seed: int = 0
    warmup: int = 1  # requests sent one at a time before the first measurement, not counted
    timeout_s: float = 600.0
    natural: bool = False  # cycle through NATURAL_TEXTS without fixed_length (streams end at different times)
    prompt_text: str | None = None  # zero-shot: the transcript of the service's default prompt voice

    def forms(self) -> list[dict[str, str]]:
        """The request bodies the clients take in turn."""
        extra = {} if self.prompt_text is None else {"prompt_text": self.prompt_text}
        if self.natural:
            return [{"text": text, **extra} for text in NATURAL_TEXTS]
        return [{"text": self.text, "fixed_length": str(self.fixed_length), **extra}]


@dataclass(frozen=True)
class LocalService:
    """How to start the service under test. None: the config's value (`max_concurrent`: the highest level,
    so a closed-loop level never queues; `max_queue`: room for the open loop's bursts)."""

    config: Path | None = None
    model_dir: Path | None = None
    backend: str | None = None
    device: str | None = None
    max_concurrent: int | None = None
    max_queue: int | None = None
    log_path: Path | None = None  # the service's log; default: a temporary file, deleted afterwards
    checkout: Path | None = None  # run the service of this checkout of cosyapp (another version) instead of ours


@dataclass
class RequestResult:
    sent_s: float  # when the request was sent, seconds after the run started
    status: int  # HTTP status; 0 when the service could not be reached
    first_audio_s: float | None = None
    total_s: float = 0.0
    audio_s: float = 0.0
    underruns: int = 0
    stall_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.audio_s > 0


class Playback:
    """A player fed by the body pieces of one stream: starts at the first byte, never pauses on its own."""

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self.plays_until: float | None = None  # when the audio received so far runs out
        self.underruns = 0
        self.stall_s = 0.0

    def arrive(self, at: float, size: int) -> None:
        if self.plays_until is None:
            self.plays_until = at
        elif at > self.plays_until:
            self.underruns += 1
            self.stall_s += at - self.plays_until
            self.plays_until = at
        self.plays_until += size / self.bytes_per_s


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation between ranks) and the mean; None for every key when empty."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(np.mean(values))}


class CpuMeter:
    """Cores kept busy during a level by the service process, this client, and everything else on the machine
    (Linux /proc; other users of a shared machine skew every figure, and this shows it). The service's own
    share is known only for a service this benchmark started; otherwise it is part of `other`."""

    def __init__(self, service_pid: int | None) -> None:
        self.service_pid = service_pid
        self.tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

    def sample(self) -> tuple[float, float, float, float] | None:
        """(wall, machine busy CPU s, service CPU s, client CPU s), None where /proc is missing."""
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait (guest is inside user)
            service = 0.0
            if self.service_pid is not None:
                with open(f"/proc/{self.service_pid}/stat") as f:
                    after_name = f.read().rsplit(")", 1)[1].split()
                service = (int(after_name[11]) + int(after_name[12])) * self.tick_s  # utime + stime
        except (OSError, ValueError, IndexError):
            return None
        return time.perf_counter(), busy * self.tick_s, service, time.process_time()

    def cores_since(self, start: tuple[float, float, float, float] | None) -> dict[str, float | None]:
        end = self.sample()
        if start is None or end is None or end[0] <= start[0]:
            return {"service": None, "client": None, "other": None}
        wall = end[0] - start[0]
        machine, service, client = ((e - s) / wall for e, s in zip(end[1:], start[1:]))
        return {"service": service if self.service_pid is not None else None, "client": client,
                "other": max(0.0, machine - service - client)}


@dataclass
class _Target:
    """What every request of a run shares."""

    client: httpx.AsyncClient
    url: str
    forms: list[dict[str, str]]
    meter: CpuMeter
    sent: int = 0

    def next_form(self) -> dict[str, str]:
        form = self.forms[self.sent % len(self.forms)]
        self.sent += 1
        return form


async def stream_request(client: httpx.AsyncClient, url: str, form: dict[str, str], run_start: float
                         ) -> RequestResult:
    """POST /synthesize and read the PCM body as it streams, timing every piece."""
    sent = time.perf_counter()
    result = RequestResult(sent_s=sent - run_start, status=0)
    try:
        async with client.stream("POST", f"{url}/synthesize", data=form) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode("utf-8", "replace")[:300]
                return result
            rate = int(response.headers["x-sample-rate"])
            channels = int(response.headers.get("x-channels", "1"))
            playback = Playback(2.0 * channels * rate)
            size = 0
            async for piece in response.aiter_raw():
                if not piece:
                    continue
                now = time.perf_counter()
                if result.first_audio_s is None:
                    result.first_audio_s = now - sent
                playback.arrive(now, len(piece))
                size += len(piece)
            result.audio_s = size / (2.0 * channels * rate)
            result.underruns, result.stall_s = playback.underruns, playback.stall_s
            if size == 0:
                result.error = "empty body"
    except httpx.HTTPError as e:  # unreachable, timed out, or the stream broke mid-body
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.total_s = time.perf_counter() - sent
    return result


def summarize(results: list[RequestResult], wall_s: float, cpu_cores: dict[str, float | None], **fields: Any
              ) -> dict[str, Any]:
    """One level's figures. Rates and percentiles count only the requests that streamed audio."""
    ok = [r for r in results if r.ok]
    audio_s = sum(r.audio_s for r in ok)
    return {
        **fields,
        "requests": len(results),
        "ok": len(ok),
        "rejected": sum(r.status == 503 for r in results),
        "failed": sum(not r.ok and r.status != 503 for r in results),
        "wall_s": wall_s,
        "first_audio_s": percentiles([r.first_audio_s for r in ok]),
        "total_s": percentiles([r.total_s for r in ok]),
        "rtf_median": float(np.median([r.total_s / r.audio_s for r in ok])) if ok else None,
        "audio_s_total": audio_s,
        "audio_s_per_s": audio_s / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "underruns_total": sum(r.underruns for r in ok),
        "requests_with_underruns": sum(r.underruns > 0 for r in ok),
        "stall_s_total": sum(r.stall_s for r in ok),
        "cpu_cores": cpu_cores,
        "errors": sorted({r.error for r in results if r.error})[:5],
        "results": [asdict(r) for r in results],
    }


async def closed_loop(target: _Target, concurrency: int, requests_per_client: int) -> dict[str, Any]:
    results: list[RequestResult] = []
    cpu_start = target.meter.sample()
    start = time.perf_counter()

    async def one_client() -> None:
        for _ in range(requests_per_client):
            results.append(await stream_request(target.client, target.url, target.next_form(), start))

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return summarize(results, time.perf_counter() - start, target.meter.cores_since(cpu_start),
                     name=f"c{concurrency}", kind="closed", concurrency=concurrency)


async def open_loop(target: _Target, rate: float, requests: int, seed: int) -> dict[str, Any]:
    """Poisson arrivals at `rate` per second (seeded), each request on its own whatever is running."""
    arrivals_rng = random.Random(seed)
    arrivals, at = [], 0.0
    for _ in range(requests):
        arrivals.append(at)
        at += arrivals_rng.expovariate(rate)
    cpu_start = target.meter.sample()
    start = time.perf_counter()

    async def arrive(offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await stream_request(target.client, target.url, target.next_form(), start)

    results = list(await asyncio.gather(*(arrive(offset) for offset in arrivals)))
    return summarize(results, time.perf_counter() - start, target.meter.cores_since(cpu_start),
                     name=f"poisson {rate:.3g}/s", kind="poisson", rate_per_s=rate)


async def run_plan(url: str, plan: LoadPlan, api_key: str | None = None, service_pid: int | None = None
                   ) -> dict[str, Any]:
    """Warm up, run every closed-loop level, then the open loop; returns the report without its header."""
    forms = plan.forms()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(plan.timeout_s, connect=10.0)
    # trust_env=False: a proxy from the environment must not sit between the benchmark and the service.
    async with httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        try:
            info = (await client.get(f"{url}/model_info")).raise_for_status().json()
        except httpx.HTTPError as e:
            raise BenchError(f"cannot get {url}/model_info: {e}") from None
        for _ in range(plan.warmup):
            warm = await stream_request(client, url, forms[0], time.perf_counter())
            if not warm.ok:
                raise BenchError(f"the warm-up request failed (status {warm.status}): {warm.error}")
        target = _Target(client, url, forms, CpuMeter(service_pid))
        levels = [await closed_loop(target, c, plan.requests_per_client) for c in plan.levels]
        rate = plan.poisson_rate
        if rate is None and levels:
            rate = AUTO_POISSON_LOAD * max(level["requests_per_s"] for level in levels)
        poisson = None
        if rate:
            poisson = await open_loop(target, rate, plan.poisson_requests, plan.seed)
        stats = (await client.get(f"{url}/stats")).json()
    return {"model_info": info, "service_stats": stats, "levels": levels, "poisson": poisson}


@contextlib.contextmanager
def start_local_service(service: LocalService, plan: LoadPlan) -> Iterator[ServiceProcess]:
    """`python -m cosyapp serve` on 127.0.0.1 at a free port, running until the block ends; yields once
    /health says ok."""
    with tempfile.TemporaryDirectory(prefix="cosyapp-bench-service-") as scratch:
        port = free_port()
        overrides = {
            "COSYAPP_SERVER_HOST": "127.0.0.1",
            "COSYAPP_SERVER_PORT": str(port),
            "COSYAPP_MODEL_BACKEND": service.backend,
            "COSYAPP_MODEL_MODEL_DIR": str(service.model_dir.resolve()) if service.model_dir else None,
            "COSYAPP_MODEL_DEVICE": service.device,
            "COSYAPP_ENGINE_MAX_CONCURRENT": str(service.max_concurrent or max(plan.levels, default=1)),
            "COSYAPP_ENGINE_MAX_QUEUE": str(service.max_queue if service.max_queue is not None
                                            else max(16, plan.poisson_requests)),
            # The speaker registry and prompt overrides of a throwaway service go to a throwaway folder.
            "COSYAPP_STORAGE_DATA_DIR": str(Path(scratch) / "data"),
        }
        env = {**os.environ, **{k: v for k, v in overrides.items() if v is not None}}
        if service.config is not None:
            env["COSYAPP_CONFIG"] = str(service.config.resolve())
        if service.checkout is not None:
            env["PYTHONPATH"] = str(service.checkout.resolve())
        log_path = service.log_path or Path(scratch) / "service.log"
        try:
            with start_service(port, env, log_path, cwd=service.checkout, startup_timeout_s=STARTUP_TIMEOUT_S,
                               stop_timeout_s=STOP_TIMEOUT_S, log_lines=LOG_TAIL_LINES) as running:
                yield running
        except ServiceStartError as e:
            raise BenchError(str(e)) from None


def checkout_commit() -> str | None:
    """The git commit of this checkout (with -dirty when the tree has changes), None outside git."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                                   text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return described.stdout.strip() or None


def run_service_bench(plan: LoadPlan, url: str | None = None, service: LocalService | None = None,
                      api_key: str | None = None) -> dict[str, Any]:
    """Benchmark the service at `url`, or (url None) one started for the run from `service`."""
    started_service = url is None
    service_pid = None
    with contextlib.ExitStack() as stack:
        if url is None:
            running = stack.enter_context(start_local_service(service or LocalService(), plan))
            url, service_pid = running.url, running.pid
        started = time.time()
        body = asyncio.run(run_plan(url.rstrip("/"), plan, api_key, service_pid))
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({platform.system()})",
        "commit": checkout_commit(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "url": url,
        "started_service": started_service,
        "plan": asdict(plan),
        **body,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


def _ratio(value: float | None, base: float | None) -> str:
    return f"x{value / base:.2f}" if value is not None and base else "-"


def _cores(cpu: dict[str, float | None]) -> str:
    return "/".join("-" if cpu[k] is None else f"{cpu[k]:.2f}" for k in ("service", "client", "other"))


def what_is_sent(plan: dict[str, Any]) -> str:
    if plan.get("natural"):
        return f"{len(NATURAL_TEXTS)} natural texts in turn (no fixed_length)"
    return f"{plan['fixed_length']} LM tokens each (fixed_length)"


def format_service_report(report: dict[str, Any]) -> str:
    """The report as a table, one line per level; the `vs` columns compare each closed-loop level with the first."""
    plan, info = report["plan"], report["model_info"]
    lines = [
        f"machine: {report['machine']}, commit {report['commit'] or '?'}",
        f"service: {report['url']} ({info.get('model_type')} from {info.get('model_dir')}, "
        f"max_concurrent {report['service_stats'].get('max_concurrent')})",
        f"requests: {what_is_sent(plan)}, {plan['requests_per_client']} per client in the closed loop; times in ms",
        "",
        f"{'level':<16}{'req':>4}{'ok':>4}{'503':>4}  {'first audio p50/p95/p99':>23}{'RTF p50':>9}"
        f"{'audio s/s':>10}{'underruns':>10}{'wall s':>7}{'s/s vs':>8}{'p95 vs':>7}  cores svc/cli/other",
    ]
    rows = report["levels"] + ([report["poisson"]] if report["poisson"] else [])
    base = report["levels"][0] if report["levels"] else None
    for row in rows:
        first = row["first_audio_s"]
        underruns = f"{row['underruns_total']} ({row['requests_with_underruns']})"
        rtf = "-" if row["rtf_median"] is None else f"{row['rtf_median']:.3f}"
        closed = base is not None and row["kind"] == "closed"
        throughput_vs = _ratio(row["audio_s_per_s"], base["audio_s_per_s"]) if closed else ""
        p95_vs = _ratio(first["p95"], base["first_audio_s"]["p95"]) if closed else ""
        lines.append(
            f"{row['name']:<16}{row['requests']:>4}{row['ok']:>4}{row['rejected']:>4}  "
            f"{_ms(first['p50']):>7}/{_ms(first['p95']):>7}/{_ms(first['p99']):>7}{rtf:>9}"
            f"{row['audio_s_per_s']:>10.2f}{underruns:>10}{row['wall_s']:>7.1f}{throughput_vs:>8}{p95_vs:>7}  "
            f"{_cores(row['cpu_cores'])}")
    lines += ["", f"underruns: total (requests with any); vs: ratio to {base['name'] if base else '-'}; cores: CPU "
                  f"cores kept busy by the service, this client and the rest of the machine; failed requests: "
                  f"{sum(row['failed'] for row in rows)}"]
    lines += [f"  {row['name']}: {error}" for row in rows for error in row["errors"]]
    return "\n".join(lines)
