"""Fish's live WebSocket TTS (`/v1/tts/live`, routes/fish_live.py) on the real service with the tiny Fish model:
driven by both Fish SDKs' WebSocket sessions, and frame by frame for the protocol's corners."""

from __future__ import annotations

import io
import time
from pathlib import Path

import fish_audio_sdk
import fishaudio
import httpx
import httpx_ws
import ormsgpack
import pytest
import soundfile

from cosyapp.audio import mp3_frame_length
from fish_service import fish_env, running_service
from service_live import assert_pcm, free_port

API_KEY = "live-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
SAMPLE_RATE = 44100
TEXT_PIECES = ["Hello there. ", "This is a live ", "stream of text, ", "spoken as it comes. ", "Bye."]


@pytest.fixture(scope="module")
def service(tiny_fish_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("fish_live")
    env = fish_env(free_port(), tiny_fish_dir, workdir / "data", COSYAPP_SERVER_API_KEY=API_KEY)
    with running_service(workdir, env) as live:
        yield live


def session_lines(service, since: int) -> list[str]:
    """The log lines of live sessions that ended after the first `since` lines of the log."""
    return [line for line in service.log().splitlines()[since:] if "mode=fish_live" in line]


def wait_for_session_end(service, since: int) -> str:
    deadline = time.monotonic() + 20
    while not (lines := session_lines(service, since)):
        assert time.monotonic() < deadline, "the session never ended"
        time.sleep(0.05)
    return lines[-1]


class Socket:
    """One live session frame by frame: `send(event)`, `events()` until the finish event."""

    def __init__(self, ws: httpx_ws.WebSocketSession) -> None:
        self.ws = ws

    def send(self, event: dict) -> None:
        self.ws.send_bytes(ormsgpack.packb(event))

    def events(self) -> list[dict]:
        received = []
        while not received or received[-1].get("event") != "finish":
            received.append(ormsgpack.unpackb(self.ws.receive_bytes(timeout=120)))
        return received


def live(service, headers: dict[str, str] = AUTH):
    client = httpx.Client(base_url=service.url, headers=headers, timeout=120)
    return httpx_ws.connect_ws("/v1/tts/live", client=client)


def test_legacy_sdk_session_streams_pcm(service) -> None:
    since = len(service.log().splitlines())
    with fish_audio_sdk.WebSocketSession(API_KEY, base_url=service.url) as session:
        request = fish_audio_sdk.TTSRequest(text="", format="pcm")
        pieces = list(session.tts(request, iter(TEXT_PIECES)))
    assert assert_pcm(b"".join(pieces)) > SAMPLE_RATE // 10
    line = wait_for_session_end(service, since)
    assert "status=101" in line and "result=ok" in line and f"text_chars={len(''.join(TEXT_PIECES))}" in line


def test_new_sdk_streams_wav_segment_by_segment(service) -> None:
    client = fishaudio.FishAudio(api_key=API_KEY, base_url=service.url)
    config = fishaudio.TTSConfig(format="wav", min_chunk_length=0)
    body = b"".join(client.tts.stream_websocket(iter(TEXT_PIECES), config=config))
    assert body[:4] == b"RIFF" and int.from_bytes(body[24:28], "little") == SAMPLE_RATE
    assert_pcm(body[44:])


def test_sentences_are_spoken_as_they_end_and_mp3_pieces_join(service) -> None:
    with live(service) as ws:
        socket = Socket(ws)
        socket.send({"event": "start", "request": {"text": "", "format": "mp3", "min_chunk_length": 0,
                                                   "max_new_tokens": 40}})
        socket.send({"event": "text", "text": "First sentence. Second"})
        # The first sentence is complete: its audio comes before any more text is sent.
        first = ormsgpack.unpackb(ws.receive_bytes(timeout=120))
        assert first["event"] == "audio"
        socket.send({"event": "text", "text": " sentence"})
        socket.send({"event": "flush"})
        socket.send({"event": "text", "text": "Third."})
        socket.send({"event": "stop"})
        events = [first, *socket.events()]
    assert [event["event"] for event in events] == ["audio", "audio", "audio", "finish"]
    assert events[-1]["reason"] == "stop"
    # Each piece is whole MP3 frames with no header frame of its own, so the pieces are one MP3 stream.
    pieces = [event["audio"] for event in events[:-1]]
    for piece in pieces:
        assert b"Xing" not in piece[:mp3_frame_length(piece)] and b"Info" not in piece[:mp3_frame_length(piece)]
        assert soundfile.info(io.BytesIO(piece)).format == "MP3"
    assert mp3_frames(b"".join(pieces)) == sum(mp3_frames(piece) for piece in pieces)


def mp3_frames(data: bytes) -> int:
    """Frames of an MP3 stream, checking it is nothing but whole frames."""
    position = count = 0
    while (length := mp3_frame_length(data, position)) is not None:
        position, count = position + length, count + 1
    assert position == len(data) and count > 0
    return count


@pytest.mark.parametrize("request_fields, words", [
    ({"format": "opus"}, "cannot be streamed live"),
    ({"sample_rate": 12345}, "sample_rate must be one of"),
    ({"prosody": {"speed": 1.5, "volume": 0}}, "prosody is not supported"),
    ({"mp3_bitrate": 100}, "mp3_bitrate must be one of"),
    ({"colour": "blue"}, "unknown field(s) colour"),
])
def test_a_bad_start_request_ends_the_session_with_an_error(service, request_fields: dict, words: str) -> None:
    with live(service) as ws:
        socket = Socket(ws)
        socket.send({"event": "start", "request": {"text": "", **request_fields}})
        events = socket.events()
    assert [event["event"] for event in events] == ["error", "finish"]
    assert words in events[0]["error"] and events[1]["reason"] == "error"


@pytest.mark.parametrize("sent, words", [
    ([{"event": "text", "text": "hi"}], "the first event must be"),
    ([{"event": "start", "request": {"text": ""}}, {"event": "shout"}], "unknown event 'shout'"),
])
def test_protocol_mistakes_end_the_session_with_an_error(service, sent: list[dict], words: str) -> None:
    with live(service) as ws:
        socket = Socket(ws)
        for event in sent:  # the last one is the mistake: nothing is sent after it, the server closes
            socket.send(event)
        events = socket.events()
    assert events[-2]["event"] == "error" and words in events[-2]["error"]
    assert events[-1] == {"event": "finish", "reason": "error"}


def test_frames_must_be_msgpack(service) -> None:
    with live(service) as ws:
        ws.send_text('{"event": "start"}')
        events = Socket(ws).events()
    assert "binary MessagePack" in events[0]["error"]


def test_the_socket_needs_the_api_key(service) -> None:
    for headers in ({}, {"authorization": "Bearer wrong"}):
        with pytest.raises(httpx_ws.WebSocketUpgradeError) as refused:
            with live(service, headers):
                pass
        assert refused.value.response.status_code == 401


def test_a_client_leaving_mid_session_cancels_its_synthesis(service) -> None:
    since = len(service.log().splitlines())
    with live(service) as ws:
        socket = Socket(ws)
        socket.send({"event": "start", "request": {"text": "", "format": "pcm", "min_chunk_length": 0}})
        socket.send({"event": "text", "text": "A long sentence that takes a while to speak, on and on. " * 4})
        socket.send({"event": "flush"})
        assert ormsgpack.unpackb(ws.receive_bytes(timeout=120))["event"] == "audio"
    line = wait_for_session_end(service, since)
    assert "result=cancelled" in line, line


def test_a_service_without_fish_says_so(live_service) -> None:
    client = httpx.Client(base_url=live_service.url, timeout=60)
    with httpx_ws.connect_ws("/v1/tts/live", client=client) as ws:
        socket = Socket(ws)
        socket.send({"event": "start", "request": {"text": ""}})
        events = socket.events()
    assert "does not run the Fish backend" in events[0]["error"]

