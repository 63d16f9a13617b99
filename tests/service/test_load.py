"""Acceptance 3: a client that disconnects mid-stream stops its generation and frees its slot; more concurrent
requests than the service takes (1 slot + 1 queue place here) get orderly 503s with Retry-After."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

import httpx

from service_live import LONG_TEXT, wait_idle


def _multipart(text: str) -> bytes:
    return (b"--b\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n" + text.encode() + b"\r\n--b--\r\n")


def test_disconnect_stops_generation_and_frees_the_slot(live_service):
    before = wait_idle(live_service)
    body = _multipart(LONG_TEXT)
    host, port = urlsplit(live_service.url).hostname, urlsplit(live_service.url).port
    # A raw socket, so "the client went away" is exactly a closed TCP connection.
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(b"POST /synthesize HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < 64:
            data = sock.recv(65536)
            assert data, f"connection closed early: {received[:300]!r}"
            received += data
        assert received.startswith(b"HTTP/1.1 200"), received[:300]
        assert live_service.stats()["active"] == 1
    disconnected_at = time.monotonic()
    after = wait_idle(live_service)
    freed_after_s = time.monotonic() - disconnected_at
    assert after["cancelled"] == before["cancelled"] + 1, after  # the backend stopped with Cancelled...
    assert after["completed"] == before["completed"]  # ...instead of finishing the text
    assert freed_after_s < 20, f"slot freed only {freed_after_s:.1f} s after the disconnect"
    # The freed slot serves the next request.
    response = httpx.post(f"{live_service.url}/synthesize", data={"text": "你好。"}, timeout=300)
    assert response.status_code == 200 and response.content
    line = next(line for line in reversed(live_service.log().splitlines())
                if "result=cancelled" in line)
    assert "status=200" in line


def test_more_requests_than_the_limit_get_orderly_503s(live_service):
    wait_idle(live_service)
    before = live_service.stats()
    assert before["max_concurrent"] == 1 and before["max_queue"] == 1

    rejected = 0
    three_rejected = asyncio.Event()

    async def one(client: httpx.AsyncClient, index: int) -> tuple[int, dict, bytes]:
        nonlocal rejected
        await asyncio.sleep(0.05 * index)  # arrive in order: the first two take the slot and the queue place
        async with client.stream("POST", "/synthesize", data={"text": LONG_TEXT}) as response:
            if response.status_code != 200:
                rejected += 1
                if rejected == 3:
                    three_rejected.set()
                return response.status_code, dict(response.headers), await response.aread()
            give_up = time.monotonic() + 60
            async for chunk in response.aiter_raw():
                # Audio is flowing. Hold the slot until the other three have had their answer (however fast
                # the model is), then leave (disconnect) so the queued request gets the slot.
                if chunk and (three_rejected.is_set() or time.monotonic() > give_up):
                    break
            return 200, dict(response.headers), b""

    async def main():
        async with httpx.AsyncClient(base_url=live_service.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(5)))

    results = asyncio.run(main())
    statuses = [status for status, _, _ in results]
    assert sorted(statuses) == [200, 200, 503, 503, 503], statuses
    for status, headers, body in results:
        if status == 503:
            assert headers["retry-after"] == "2"
            assert headers["content-type"] == "application/json"
            assert "busy" in httpx.Response(503, content=body).json()["detail"]
    after = wait_idle(live_service)
    assert after["rejected"] == before["rejected"] + 3
    assert httpx.get(f"{live_service.url}/health", timeout=10).json()["status"] == "ok"
