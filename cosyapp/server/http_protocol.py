"""uvicorn's HTTP protocol with limits on how a client sends a request's head.

uvicorn waits for a request's headers without end and without bound: a client trickling a header a byte at a
time holds a connection (and its buffer) for as long as it likes. Here the head must arrive within
`[server] header_timeout_s` of its first byte (of the connection's opening for the first request) and be at
most MAX_HEAD_BYTES; otherwise the connection is closed (too slow) or answered 400 and closed (too large).
The body has its own time limit where it is read (`bodies.limited_request`). Idle keep-alive connections are
uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Request line plus headers. Browsers and HTTP clients send a few kB; uvicorn has no limit of its own.
MAX_HEAD_BYTES = 64 * 1024


class HeadTooLarge(Exception):
    """Raised inside a parser callback: httptools reports it as a parse error, which uvicorn answers 400."""


def limited_protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`http=`), with this header timeout."""

    class LimitedHttpProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._start_head_timer()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._stop_head_timer()
            super().on_headers_complete()

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                raise HeadTooLarge(f"request head over {MAX_HEAD_BYTES} bytes")

        def _start_head_timer(self) -> None:
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return LimitedHttpProtocol
