"""One test per failure a fuzz, disconnect and crash campaign found in the service; each failed before the fix.

The service is conftest's: CosyVoice2 + Fish on tiny models, one slot, four queue places, 1 s header timeout and
2 s body timeout."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse

import httpx
import ormsgpack
import pytest
from websockets.sync.client import connect

from cosyapp.backends.cosyvoice2.text import spell_out_number
from cosyapp.config import PROJECT_ROOT
from cosyapp.robustness.service import rss_mb, wait_until_idle
from cosyapp.server.text_segments import TextSegmenter

PROMPT = (PROJECT_ROOT / "asset" / "zero_shot_prompt.wav").read_bytes()
PROMPT_B64 = base64.b64encode(PROMPT).decode()
TEXT_LIMIT = 2000  # [limits] max_text_chars, the shipped default
MB = 1_000_000
LONG_TEXT = "。".join(["欢迎光临本店", "今天的特价菜是红烧肉和清蒸鱼", "请问您几位用餐"] * 20) + "。"


def detail(answer: httpx.Response) -> str:
    """The error message, in the service's shape or in OpenAI's (/v1/audio/speech)."""
    body = answer.json()
    return body["detail"] if "detail" in body else body["error"]["message"]


def post_json(client: httpx.Client, path: str, raw: str, method: str = "POST") -> httpx.Response:
    return client.request(method, path, content=raw.encode(), headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def speakers(robust_service) -> list[str]:
    """Two registered voices (the unknown-speaker errors must not tell one client the other's id)."""
    names = ["alice_voice", "bob_voice"]
    with httpx.Client(base_url=robust_service.url, timeout=120, trust_env=False) as client:
        for name in names:
            answer = client.post("/add_speaker", data={"name": name, "reference_text": "hello"},
                                 files={"audio_file": ("voice.wav", PROMPT, "audio/wav")})
            assert answer.status_code in (200, 409), answer.text
    return names


# ---------------------------------------------------------------- 1. a live text event froze the event loop


def test_segmenting_is_linear_in_the_text():
    """Cutting n characters without a sentence end or break looks at O(n) characters (it was O(n^2 / chunk))."""
    looked_at = 0

    class Counting(TextSegmenter):
        def _cut(self, window: str) -> int | None:
            nonlocal looked_at
            looked_at += len(window)
            return super()._cut(window)

    segmenter = Counting(min_chars=50, max_chars=200)
    text = "x" * 200_000
    segments = segmenter.add(text) + segmenter.flush()
    assert "".join(segments) == text and max(map(len, segments)) <= 200
    assert looked_at <= 2 * len(text)


def test_a_huge_live_text_event_is_refused_and_the_service_stays_responsive(robust_service, client):
    health: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30, trust_env=False) as prober:
            while not stop.is_set():
                started = time.perf_counter()
                prober.get(f"{robust_service.url}/health")
                health.append(time.perf_counter() - started)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    while not health:
        time.sleep(0.01)
    try:
        with connect(robust_service.url.replace("http", "ws") + "/v1/tts/live", open_timeout=10,
                     max_size=None) as socket_:
            socket_.send(ormsgpack.packb({"event": "start", "request": {"text": "", "format": "pcm"}}))
            socket_.send(ormsgpack.packb({"event": "text", "text": "x" * 512_000}))
            events = [ormsgpack.unpackb(socket_.recv(timeout=30)) for _ in range(2)]
        probes = len(health)
        while len(health) < probes + 2:  # and /health answers right after
            time.sleep(0.01)
    finally:
        stop.set()
        prober.join()
    assert events[0]["event"] == "error" and "too long" in events[0]["error"], events
    assert events[1] == {"event": "finish", "reason": "error"}
    assert max(health) < 0.5, f"/health took {max(health):.2f} s while the event was handled"


# ---------------------------------------------------------------- 2. /v1/tts took unbounded text


def test_v1_tts_text_is_limited_by_default(robust_service, client):
    answer = post_json(client, "/v1/tts", json.dumps({"text": "a" * (TEXT_LIMIT + 1)}))
    assert answer.status_code == 400 and str(TEXT_LIMIT) in detail(answer)
    before = rss_mb(robust_service.pid)
    answer = post_json(client, "/v1/tts", json.dumps({"text": "a" * (20 * MB)}))
    assert answer.status_code == 400 and str(TEXT_LIMIT) in detail(answer)
    assert rss_mb(robust_service.pid) - before < 300


# ---------------------------------------------------------------- 3. inputs that made a 500

DEEP = "[" * 10_000 + "]" * 10_000  # far past Python's recursion limit, within /speak's 23 KiB body limit
NESTED = [
    ("POST", "/v1/tts", '{"text": %s}'),
    ("POST", "/v1/audio/speech", '{"input": %s}'),
    ("POST", "/generate_audio_enhanced_async", '{"step_id": "a", "text": %s}'),
    ("POST", "/v1/vqgan/encode", '{"audios": %s}'),
    ("POST", "/v1/vqgan/decode", '{"tokens": %s}'),
    ("POST", "/v1/references/add", '{"id": "x", "text": "t", "audio": %s}'),
    ("DELETE", "/v1/references/delete", '{"reference_id": %s}'),
    ("POST", "/v1/references/update", '{"old_reference_id": %s}'),
    ("POST", "/speak", '{"name": "a", "text": %s}'),
]


@pytest.mark.parametrize("method, path, template", NESTED, ids=[path for _, path, _ in NESTED])
def test_deeply_nested_json_is_a_400(client, method: str, path: str, template: str):
    answer = post_json(client, path, template % DEEP, method)
    assert answer.status_code == 400, answer.text[:300]
    assert "nested too deeply" in detail(answer)


SURROGATE = "hi \\ud800 there"  # a JSON escape of a lone surrogate
DIGITS_400 = "9" * 400
BAD_VALUES = [
    ("/v1/references/add", '{"id": "s1", "audio": "%s", "text": "%s"}' % (PROMPT_B64, SURROGATE), "text"),
    ("/v1/audio/speech", '{"input": "%s"}' % SURROGATE, "input"),
    ("/v1/audio/speech", '{"input": "hi", "instructions": "%s"}' % SURROGATE, "instructions"),
    ("/speak", '{"name": "alice_voice", "text": "%s"}' % SURROGATE, "text"),
    ("/speak", '{"name": "alice_voice", "text": "hi", "temperature": %s}' % DIGITS_400, "temperature"),
    ("/speak", '{"name": "alice_voice", "text": "hi", "top_p": %s}' % DIGITS_400, "top_p"),
    ("/v1/audio/speech", '{"input": "hi", "speed": %s}' % DIGITS_400, "speed"),
]


@pytest.mark.parametrize("path, raw, field", BAD_VALUES, ids=[f"{p}-{f}" for p, _, f in BAD_VALUES])
def test_lone_surrogates_and_huge_integers_are_a_400_naming_the_field(client, speakers, path: str, raw: str,
                                                                      field: str):
    answer = post_json(client, path, raw)
    assert answer.status_code == 400, answer.text[:300]
    assert detail(answer).startswith(field), answer.json()


def test_a_transcript_of_thousands_of_digits(client):
    answer = client.post("/clone_voice", data={"text": "hi", "reference_text": "9" * 5000},
                         files={"reference_audio_file": ("v.wav", PROMPT, "audio/wav")})
    assert answer.status_code == 400 and "reference_text is too long" in answer.json()["detail"]
    # Below the limit too: the English number reader takes any digit run (int() refuses 4300+ digits).
    assert spell_out_number("9" * 5000).split() == ["nine"] * 5000


# ---------------------------------------------------------------- 4. queued clients that hang up


def _raw_request(port: int, path: str, form: dict[str, str]) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port))
    body = urllib.parse.urlencode(form).encode()
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return connection


def _reset(connection: socket.socket) -> None:
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    connection.close()  # linger 0: a reset, as the campaign's clients did


def test_clients_that_hang_up_while_queued_leave_the_queue(robust_service, client):
    busy = _raw_request(robust_service.port, "/synthesize", {"text": LONG_TEXT, "fixed_length": "1000"})
    try:
        assert busy.recv(12) == b"HTTP/1.1 200"  # it holds the only slot and streams
        queued = [_raw_request(robust_service.port, "/synthesize", {"text": "hello", "fixed_length": "20"})
                  for _ in range(4)]
        deadline = time.monotonic() + 10
        while client.get("/stats").json()["in_flight"] < 5:
            assert time.monotonic() < deadline, client.get("/stats").json()
            time.sleep(0.02)
        for connection in queued:
            _reset(connection)
        deadline = time.monotonic() + 1.0
        while (stats := client.get("/stats").json())["in_flight"] != 1:
            assert time.monotonic() < deadline, f"queued requests kept their places: {stats}"
            time.sleep(0.02)
        assert stats["waiting"] == 0
    finally:
        _reset(busy)
    assert wait_until_idle(client, robust_service.url, 10)[0]


# ---------------------------------------------------------------- 5. /v1/vqgan/decode held gigabytes


def test_decoding_codes_works_in_bounded_memory(robust_service, client):
    encoded = post_json(client, "/v1/vqgan/encode", json.dumps({"audios": [PROMPT_B64]}))
    n_codebooks = len(encoded.json()["tokens"][0])
    before = rss_mb(robust_service.pid)
    tokens = [[[(row * 7 + i) % 1000 for i in range(2048)] for row in range(n_codebooks)]]
    answer = post_json(client, "/v1/vqgan/decode", json.dumps({"tokens": tokens}))
    assert answer.status_code == 200, answer.text[:300]
    assert len(base64.b64decode(answer.json()["audios"][0])) == 2048 * 2048 * 2  # float16 samples
    assert rss_mb(robust_service.pid) - before < 400


# ---------------------------------------------------------------- 7. errors that echoed the input


HUGE = "x" * MB
ECHOES = [
    ("POST", "/v1/tts", {"text": "hi", "format": HUGE}),
    ("POST", "/v1/tts", {"text": "hi", HUGE: 1}),
    ("POST", "/generate_audio_enhanced_async", {"step_id": HUGE, "text": "hi"}),
    ("POST", "/v1/audio/speech", {"input": "hi", "response_format": HUGE}),
    ("POST", "/v1/references/update", {"old_reference_id": "alice_voice", "new_reference_id": HUGE}),
]


@pytest.mark.parametrize("method, path, body", ECHOES, ids=[f"{p}-{i}" for i, (_, p, _) in enumerate(ECHOES)])
def test_errors_quote_only_a_short_prefix_of_the_input(client, speakers, method: str, path: str, body: dict):
    answer = post_json(client, path, json.dumps(body), method)
    assert 400 <= answer.status_code < 500 and len(answer.content) < 2000, answer.content[:300]


def test_an_unknown_speaker_error_lists_no_other_voices(client, speakers):
    answers = [client.post("/synthesize", data={"text": "hi", "speaker": "nobody"}),
               post_json(client, "/speak", json.dumps({"name": "nobody", "text": "hi"})),
               client.post("/delete_speaker", data={"name": "nobody"})]
    for answer in answers:
        assert 400 <= answer.status_code < 500 and "nobody" in answer.text, answer.text
        assert not any(name in answer.text for name in speakers), answer.text


# ---------------------------------------------------------------- 8. one text limit; slow clients timed out


def test_every_api_has_the_same_instruction_limit(client):
    instruction = "x" * (TEXT_LIMIT + 1)
    answers = [post_json(client, "/v1/audio/speech", json.dumps({"input": "hi", "instructions": instruction})),
               client.post("/synthesize", data={"text": "hi", "instruction": instruction})]
    for answer in answers:
        assert answer.status_code == 400 and str(TEXT_LIMIT) in answer.text, answer.text[:300]


def test_a_trickled_header_is_cut_off(robust_service, timeouts_s):
    connection = socket.create_connection(("127.0.0.1", robust_service.port))
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < timeouts_s["header"] + 3:
        try:
            connection.sendall(b"a")
            connection.settimeout(0.2)
            closed = connection.recv(1024) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
        if closed:
            break
    connection.close()
    assert closed, "the server held a connection whose header never ended"
    assert time.monotonic() - started < timeouts_s["header"] + 2


def test_an_oversized_request_head_is_refused(client):
    answer = client.get("/health", headers={"X-Big": "x" * 100_000})
    assert answer.status_code == 400


def test_a_trickled_body_gets_408(robust_service, timeouts_s):
    connection = socket.create_connection(("127.0.0.1", robust_service.port))
    connection.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"input\"")
    connection.settimeout(timeouts_s["body"] + 5)
    started = time.monotonic()
    answer = connection.recv(4096)
    connection.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < timeouts_s["body"] + 2


# ---------------------------------------------------------------- found by the campaign's own fuzz run


def test_concurrent_deletes_of_one_voice_are_200_or_404(robust_service, client):
    added = client.post("/add_speaker", data={"name": "short_lived", "reference_text": "hello"},
                        files={"audio_file": ("voice.wav", PROMPT, "audio/wav")})
    assert added.status_code == 200, added.text

    def delete() -> int:
        with httpx.Client(base_url=robust_service.url, timeout=30, trust_env=False) as own:
            return own.post("/delete_speaker", data={"name": "short_lived"}).status_code

    threads_statuses: list[int] = []
    threads = [threading.Thread(target=lambda: threads_statuses.append(delete())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(threads_statuses)) in ([200, 404], [200]) and threads_statuses.count(200) == 1, threads_statuses
