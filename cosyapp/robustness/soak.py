"""The soak: a steady mixed load of ordinary requests for a while, with the service's resident memory sampled
throughout; memory must level off once the service is warm.

The load: `clients` clients each send, in turn, a streamed /synthesize, a streamed /v1/tts, an OpenAI
/v1/audio/speech, a short live-socket session, a small /v1/vqgan/decode, a bad request and a /health, reading
every answer whole. Reported: RSS at the end of the warm-up (the first minute, or the first fifth of a shorter
soak), at the end, the change between them, and the slope (least squares over the samples after the warm-up)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import ormsgpack
import websockets

from cosyapp.robustness.service import rss_mb

SAMPLE_EVERY_S = 5.0
WARMUP_S = 60.0


@dataclass
class SoakResult:
    seconds: float = 0.0
    requests: int = 0
    failures: int = 0  # answers of 5xx but 503, or dropped connections
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MB)
    warm_rss_mb: float = 0.0
    end_rss_mb: float = 0.0
    change_percent: float = 0.0
    slope_mb_per_min: float = 0.0


async def _live(url: str) -> None:
    async with websockets.connect(url.replace("http", "ws", 1) + "/v1/tts/live", max_size=None) as live:
        await live.send(ormsgpack.packb({"event": "start", "request": {"format": "pcm", "max_new_tokens": 24}}))
        await live.send(ormsgpack.packb({"event": "text", "text": "Hello there. "}))
        await live.send(ormsgpack.packb({"event": "stop"}))
        async for message in live:
            if ormsgpack.unpackb(message).get("event") == "finish":
                break


async def _round(client: httpx.AsyncClient, url: str, codebooks: int) -> list[int]:
    """One of each request of the mix; their statuses."""
    statuses = []
    requests = [
        ("POST", "/synthesize", {"data": {"text": "Hello, how are you today?", "fixed_length": "40"}}),
        ("POST", "/v1/tts", {"json": {"text": "Good morning.", "streaming": True, "format": "pcm",
                                      "max_new_tokens": 24}}),
        ("POST", "/v1/audio/speech", {"json": {"input": "See you soon.", "response_format": "pcm"}}),
        ("POST", "/v1/vqgan/decode", {"json": {"tokens": [[[i % 1000 for i in range(16)]] * codebooks]}}),
        ("POST", "/v1/tts", {"json": {"text": "", "unknown": 1}}),
        ("GET", "/health", {}),
    ]
    for method, path, options in requests:
        async with client.stream(method, path, **options) as response:
            await response.aread()
            statuses.append(response.status_code)
    await _live(url)
    return statuses


async def run_soak(url: str, pid: int, seconds: float, codebooks: int, clients: int = 2) -> SoakResult:
    result = SoakResult()
    started = time.perf_counter()
    deadline = started + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            try:
                statuses = await _round(client, url, codebooks)
            except (httpx.TransportError, websockets.WebSocketException, OSError):
                result.failures += 1
                continue
            result.requests += len(statuses) + 1
            result.failures += sum(status >= 500 and status != 503 for status in statuses)

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            result.samples.append((time.perf_counter() - started, rss_mb(pid)))
            await asyncio.sleep(SAMPLE_EVERY_S)
        result.samples.append((time.perf_counter() - started, rss_mb(pid)))

    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False) as client:
        await asyncio.gather(sampler(), *(client_loop(client) for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    summarize(result, min(WARMUP_S, seconds / 5))
    return result


def summarize(result: SoakResult, warmup_s: float) -> None:
    """The warm and end RSS, their change and the slope after the warm-up, from the samples."""
    warm = [(t, rss) for t, rss in result.samples if t >= warmup_s] or result.samples[-1:]
    result.warm_rss_mb = warm[0][1]
    result.end_rss_mb = result.samples[-1][1]
    result.change_percent = 100 * (result.end_rss_mb - result.warm_rss_mb) / result.warm_rss_mb
    if len(warm) >= 2:
        times, rss = np.array(warm).T
        result.slope_mb_per_min = float(np.polyfit(times / 60, rss, 1)[0])
