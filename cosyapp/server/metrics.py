"""Prometheus metrics of one app (`GET /metrics`): requests by route and status, first-audio latency, real-time
factor, the engines' streams, audio and voice cache, and the time of each engine stage.

Every app has a registry of its own (not prometheus_client's global one), so several apps in one process (tests)
keep separate counts. Engine counters are read from the engines when scraped, not copied on every change.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosyapp.engine.stats import StageTimes
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.state import ServiceState

# Seconds until the first audio: from the small first chunks of a GPU (~0.1 s) to a loaded CPU (~10 s).
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# Wall time per second of audio: below 1 keeps up with playback.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
# One stage of one step: an LM token (~ms) up to a whole sentence's vocoding on a CPU.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED = "unmatched"


class ObservedStages(StageTimes):
    """Stage times that go into the stage histogram as the engine records them (no CUDA syncs: see stats.py)."""

    def __init__(self, histogram: Histogram, backend: str) -> None:
        super().__init__(synchronize=False)
        self._histogram = histogram
        self._backend = backend

    def add(self, name: str, seconds: float) -> None:
        self._histogram.labels(self._backend, name).observe(seconds)


class EngineCollector(Collector):
    """The engines' own counters, read at scrape time."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("cosyapp_active_streams", "Requests synthesizing now (holding a slot)",
                                   labels=["backend"])
        queued = GaugeMetricFamily("cosyapp_queued_streams", "Admitted requests waiting for a slot", labels=["backend"])
        audio = CounterMetricFamily("cosyapp_audio_seconds", "Seconds of audio produced", labels=["backend"])
        hits = CounterMetricFamily("cosyapp_voice_cache_hits", "Prompt voices found prepared", labels=["backend"])
        misses = CounterMetricFamily("cosyapp_voice_cache_misses", "Prompt voices prepared from a recording",
                                     labels=["backend"])
        rejected = CounterMetricFamily("cosyapp_rejected_busy", "Requests refused with 503: every slot and queue "
                                       "place taken", labels=["backend"])
        for name, engine in list(self.state.engines.items()):
            stats = engine.stats
            active.add_metric([name], stats.active)
            queued.add_metric([name], stats.in_flight - stats.active)
            audio.add_metric([name], stats.audio_seconds)
            hits.add_metric([name], stats.voice_cache_hits)
            misses.add_metric([name], stats.voice_cache_misses)
            rejected.add_metric([name], stats.rejected)
        yield from (active, queued, audio, hits, misses, rejected)


class Metrics:
    def __init__(self, state: ServiceState) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cosyapp_requests", "HTTP requests and WebSocket sessions answered",
                                ["route", "status"], registry=self.registry)
        self.first_audio = Histogram("cosyapp_first_audio_seconds", "Time from a request's arrival to its first "
                                     "audio", ["backend"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.real_time_factor = Histogram("cosyapp_real_time_factor", "Wall time per second of audio of the requests "
                                          "that completed", ["backend"], buckets=RTF_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("cosyapp_engine_stage_seconds", "Time of one engine stage (LM token, flow, "
                                       "vocoder, codec chunk, ...)", ["backend", "stage"], buckets=STAGE_BUCKETS,
                                       registry=self.registry)
        self.registry.register(EngineCollector(state))

    def stage_times(self, backend: str) -> StageTimes:
        return ObservedStages(self.stage_seconds, backend)

    def observe_request(self, record: RequestRecord, wall_s: float, result: str) -> None:
        if record.ttfb_s is not None:
            self.first_audio.labels(record.backend).observe(record.ttfb_s)
        # A live session's wall time includes waiting for the client's text: no real-time factor of its own.
        if result == "ok" and record.audio_s > 0 and not record.session:
            self.real_time_factor.labels(record.backend).observe(wall_s / record.audio_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """Pure ASGI middleware counting every HTTP request and WebSocket session by route template and status
    (streamed answers pass through untouched). Requests refused before routing (401) count under their route."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", UNMATCHED)
        return UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets when the app raises before answering

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif message["type"] == "websocket.accept":
                status = 101
            elif message["type"] == "websocket.close" and status == 500:
                status = 403  # closed during the handshake
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(self._route(scope), str(status)).inc()
