"""The disconnect storm: clients that hang up (a TCP reset) at random moments, then a check that the engine has
nothing left in flight within a second.

Each disconnect is one of: a streamed synthesis dropped after a random time (often before its answer started:
while it waits in the queue, since the storm runs more clients than slots and queue places), a whole-file
answer dropped while it is being made, an upload dropped halfway through its body, and a live-socket session
dropped while it speaks."""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import httpx
import ormsgpack
import websockets

from cosyapp.robustness.service import PROMPT, stats

LONG_TEXT = "Welcome to the shop. Today we have fresh bread and cakes. Please take a number and wait."
KINDS = ("streamed", "streamed", "whole_file", "upload", "live")
LINGER_RESET = struct.pack("ii", 1, 0)  # close with a reset, as a client that vanishes


@dataclass
class StormResult:
    disconnects: int = 0
    kinds: collections.Counter = field(default_factory=collections.Counter)
    before_answer: int = 0  # dropped before the answer's first byte (queued, or waiting for the first audio)
    idle_after_s: float = 0.0  # from the last disconnect until /stats showed nothing in flight
    idle: bool = False
    final_stats: dict = field(default_factory=dict)
    seconds: float = 0.0


def _request_bytes(path: str, content_type: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: storm\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _form(fields: dict[str, str]) -> bytes:
    return "&".join(f"{name}={value}" for name, value in fields.items()).encode()


def _multipart(boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhello\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"prompt_wav\"; filename=\"v.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + PROMPT + f"\r\n--{boundary}--\r\n".encode()


async def _drop_http(port: int, data: bytes, send_bytes: int, wait_s: float) -> bool:
    """Send the first `send_bytes` of `data`, read for `wait_s`, reset. Whether any answer had arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data[:send_bytes])
        await writer.drain()
        try:
            answered = bool(await asyncio.wait_for(reader.read(65536), wait_s))
        except asyncio.TimeoutError:
            answered = False
        return answered
    finally:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        writer.transport.abort()


async def _drop_live(url: str, wait_s: float) -> bool:
    async with websockets.connect(url.replace("http", "ws", 1) + "/v1/tts/live", max_size=None) as live:
        await live.send(ormsgpack.packb({"event": "start", "request": {"format": "pcm", "max_new_tokens": 200}}))
        await live.send(ormsgpack.packb({"event": "text", "text": LONG_TEXT}))
        await live.send(ormsgpack.packb({"event": "flush"}))
        try:
            answered = bool(await asyncio.wait_for(live.recv(), wait_s))
        except asyncio.TimeoutError:
            answered = False
        live.transport.abort()
        return answered


async def _one(url: str, port: int, kind: str, rng: random.Random) -> bool:
    wait_s = rng.uniform(0.0, 1.0)
    if kind == "streamed":
        data = _request_bytes("/synthesize", "application/x-www-form-urlencoded",
                              _form({"text": LONG_TEXT, "fixed_length": "300"}))
        return await _drop_http(port, data, len(data), wait_s)
    if kind == "whole_file":
        body = ormsgpack.packb({"text": LONG_TEXT, "max_new_tokens": 300, "format": "wav"})
        data = _request_bytes("/v1/tts", "application/msgpack", body)
        return await _drop_http(port, data, len(data), wait_s)
    if kind == "upload":
        data = _request_bytes("/synthesize", "multipart/form-data; boundary=stormb", _multipart("stormb"))
        return await _drop_http(port, data, rng.randrange(len(data) // 4, len(data)), wait_s)
    return await _drop_live(url, wait_s)


async def run_storm(url: str, port: int, count: int, concurrency: int = 12, seed: int = 0,
                    idle_within_s: float = 1.0) -> StormResult:
    """`count` random disconnects from `concurrency` clients at once, then the in-flight check."""
    rng = random.Random(seed)
    result = StormResult()
    started = time.perf_counter()
    remaining = count

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            kind = rng.choice(KINDS)
            try:
                answered = await _one(url, port, kind, rng)
            except (OSError, websockets.WebSocketException):
                answered = True  # refused (e.g. 503 on the handshake): nothing of it was left waiting
            result.disconnects += 1
            result.kinds[kind] += 1
            result.before_answer += not answered

    await asyncio.gather(*(client() for _ in range(concurrency)))
    last = time.perf_counter()
    with httpx.Client(timeout=10, trust_env=False) as http:
        while True:
            result.final_stats = stats(http, url)
            result.idle_after_s = time.perf_counter() - last
            if result.final_stats["in_flight"] == 0 and result.final_stats["active"] == 0:
                result.idle = result.idle_after_s <= idle_within_s
                break
            if result.idle_after_s > 30:
                break
            await asyncio.sleep(0.02)
    result.seconds = last - started
    return result
