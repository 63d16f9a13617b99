"""Send the fuzz corpus to a running service and count what came back.

Cases go out from `concurrency` clients at once. An HTTP case counts when its answer's head arrives (the body
is dropped unread, which also exercises disconnects mid-answer); a live session when the server sends its
finish event or closes. Counted: answers by status, 500s (a live session's "internal server error" event too,
and a connection the server dropped without an answer), hangs (nothing within `hang_s`), and /health's latency,
probed throughout. The service's memory is read before and after (after it is idle again)."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import httpx
import ormsgpack
import websockets

from cosyapp.robustness.corpus import Case
from cosyapp.robustness.service import HealthProbe

# No answer head (or, on the live socket, no event) for this long is a hang. A non-streamed synthesis answers only
# once all of its audio is made: the default 1024 Fish frames of a random-weight model (which never stops early),
# queued behind others on a busy 2-core CPU, took over 30 s.
HANG_S = 60.0
INTERNAL_ERROR = "internal server error"


@dataclass
class FuzzResult:
    cases: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)  # descriptions of the cases answered 500
    hangs: list[str] = field(default_factory=list)
    live_sessions: int = 0
    routes: set[str] = field(default_factory=set)
    health_p99_s: float = 0.0
    health_failures: int = 0
    seconds: float = 0.0


NOT_SENT = -1  # a case the HTTP client itself refuses to send (e.g. a path it cannot encode)


async def _http_case(client: httpx.AsyncClient, case: Case) -> int:
    try:
        request = client.build_request(case.method, case.path, headers=case.headers, content=case.body or None,
                                       data=case.form, files=case.files)
    except (httpx.InvalidURL, ValueError):  # UnicodeEncodeError included
        return NOT_SENT
    response = await client.send(request, stream=True)
    await response.aclose()  # the head is the answer; the audio is not read
    return response.status_code


async def _live_case(url: str, case: Case, hang_s: float) -> int:
    """101 when the session ended as the protocol says (a finish event, or the server closing after an error),
    500 when the server reported an internal error or dropped the session without a word. A session may speak
    for long; it hangs when no event comes for `hang_s`."""
    async with websockets.connect(url.replace("http", "ws", 1) + case.path, max_size=None,
                                  open_timeout=hang_s) as socket:
        try:
            for frame in case.frames:
                await socket.send(frame)
            while True:
                message = await asyncio.wait_for(socket.recv(), hang_s)
                event = ormsgpack.unpackb(message) if isinstance(message, bytes) else {}
                if event.get("event") == "error" and INTERNAL_ERROR in str(event.get("error")):
                    return 500
                if event.get("event") == "finish":
                    return 101
        except websockets.ConnectionClosedOK:
            return 101
        except websockets.ConnectionClosedError as e:
            return 101 if e.rcvd is not None else 500


async def run_fuzz(url: str, cases: list[Case], concurrency: int = 8, hang_s: float = HANG_S) -> FuzzResult:
    result = FuzzResult()
    pending: asyncio.Queue[Case] = asyncio.Queue()
    for case in cases:
        pending.put_nowait(case)
    probe = HealthProbe(url)
    stop = asyncio.Event()
    started = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while not pending.empty():
            case = pending.get_nowait()
            try:
                if case.frames:
                    status = await _live_case(url, case, hang_s)
                    result.live_sessions += 1
                else:
                    status = await asyncio.wait_for(_http_case(client, case), hang_s)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                result.hangs.append(case.describe())
                status = 0
            except websockets.InvalidStatus as e:  # the handshake was answered with an HTTP error
                status = e.response.status_code
            except (OSError, httpx.TransportError, websockets.WebSocketException):
                status = 500  # the server dropped the connection without an answer
            result.cases += 1
            result.routes.add(f"{case.method} {case.label}")
            result.statuses[status] += 1
            if status >= 500 and status != 503:
                result.server_errors.append(f"{status}: {case.describe()}")

    probing = asyncio.create_task(probe.run(stop))
    # A fresh connection per case: a connection the server drops is then its failure, not a keep-alive race.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=hang_s, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    stop.set()
    await probing
    result.seconds = time.perf_counter() - started
    result.health_p99_s = probe.p99()
    result.health_failures = probe.failures
    return result
