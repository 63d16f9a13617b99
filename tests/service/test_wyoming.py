"""The Wyoming TTS server (server/wyoming_tts.py) on the real service with the tiny CosyVoice2 model, driven by the
`wyoming` package's own client the way Home Assistant drives it: describe/info, synthesize, streamed text (announced
or not), an unknown voice, and a client that leaves mid-synthesis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from wyoming.audio import AudioChunk, AudioStart
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from service_live import DEFAULT_PROMPT, free_port, running_service, service_env, wait_idle

SPEAKER = "clerk"
# Several sentences: the synthesis runs long enough that its first audio arrives well before its end.
SENTENCES = ("欢迎光临本店。今天的特价菜是红烧肉和清蒸鱼。请问您几位用餐？这边请坐。"
             "我们的服务员马上为您点菜。祝您用餐愉快。")


@pytest.fixture(scope="module")
def service(tiny_cosyvoice2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("wyoming")
    port = free_port()
    env = {**service_env(workdir, "cosyvoice2", tiny_cosyvoice2_dir), "COSYAPP_WYOMING_ENABLED": "true",
           "COSYAPP_WYOMING_HOST": "127.0.0.1", "COSYAPP_WYOMING_PORT": str(port)}
    with running_service(workdir, env) as live:
        with open(DEFAULT_PROMPT, "rb") as audio:
            added = httpx.post(f"{live.url}/add_speaker", timeout=120,
                               data={"name": SPEAKER, "reference_text": "欢迎光临，请问您需要点什么？"},
                               files={"audio_file": ("clerk.wav", audio, "audio/wav")})
        assert added.status_code == 200, added.text
        live.wyoming_port = port
        yield live


def client(service) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", service.wyoming_port, connect_timeout=10, read_timeout=120)


async def read_until(tcp: AsyncTcpClient, last: str) -> list[Event]:
    """Events up to and including the first of type `last`."""
    events = []
    while not events or events[-1].type != last:
        event = await tcp.read_event()
        assert event is not None, f"the server closed the connection before {last}; got {[e.type for e in events]}"
        events.append(event)
    return events


def check_audio(events: list[Event]) -> bytes:
    """One audio-start, chunks in its format, one audio-stop; the PCM."""
    types = [event.type for event in events]
    assert types.count("audio-start") == 1 and types.count("audio-stop") == 1, types
    start = AudioStart.from_event(events[types.index("audio-start")])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    chunks = [AudioChunk.from_event(event) for event in events if AudioChunk.is_type(event.type)]
    assert all((c.rate, c.width, c.channels) == (start.rate, start.width, start.channels) for c in chunks)
    assert types.index("audio-start") < types.index("audio-chunk") and types.index("audio-stop") > max(
        i for i, t in enumerate(types) if t == "audio-chunk")
    return b"".join(chunk.audio for chunk in chunks)


def request_lines(service, since: int) -> list[str]:
    return [line for line in service.log().splitlines()[since:] if "request id=" in line]


def test_describe_lists_the_tts_program_and_its_voices(service) -> None:
    async def describe() -> Info:
        async with client(service) as tcp:
            await tcp.write_event(Describe().event())
            return Info.from_event((await read_until(tcp, "info"))[-1])

    (program,) = asyncio.run(describe()).tts
    assert program.name == "cosyapp" and program.installed and program.supports_synthesize_streaming
    voices = {voice.name: voice for voice in program.voices}
    assert set(voices) == {"default", SPEAKER}
    assert all("zh" in voice.languages and "en" in voice.languages for voice in voices.values())


def test_synthesize_streams_audio_chunks_while_it_is_synthesized(service) -> None:
    async def synthesize() -> tuple[list[Event], dict, list[Event]]:
        async with client(service) as tcp:
            await tcp.write_event(Synthesize(text=SENTENCES, voice=SynthesizeVoice(name=SPEAKER)).event())
            first = await read_until(tcp, "audio-chunk")
            while_running = await asyncio.to_thread(service.stats)  # the synthesis is still going on
            return first, while_running, await read_until(tcp, "audio-stop")

    first, while_running, rest = asyncio.run(synthesize())
    assert while_running["active"] == 1, while_running
    pcm = check_audio(first + rest)
    assert len([event for event in first + rest if event.type == "audio-chunk"]) >= 5
    assert len(pcm) > 24000 * 2  # more than a second of audio
    assert wait_idle(service)["active"] == 0


def test_streamed_text_is_spoken_sentence_by_sentence_then_synthesize_stopped(service) -> None:
    since = len(service.log().splitlines())

    async def stream() -> tuple[list[Event], list[Event]]:
        async with client(service) as tcp:
            await tcp.write_event(SynthesizeStart(voice=SynthesizeVoice(name="default")).event())
            await tcp.write_event(SynthesizeChunk(text="Hello there. This is").event())
            # The first sentence is complete: its audio comes while the rest of the text is still being written.
            first = await read_until(tcp, "audio-chunk")
            for text in (" a streamed text, sent", " in pieces. And a third one."):
                await tcp.write_event(SynthesizeChunk(text=text).event())
            # Home Assistant repeats the whole text for servers that do not stream: it must not be spoken twice.
            await tcp.write_event(Synthesize(text="Hello there. This is a streamed text, sent in pieces. "
                                                  "And a third one.").event())
            await tcp.write_event(SynthesizeStop().event())
            return first, await read_until(tcp, "synthesize-stopped")

    first, rest = asyncio.run(stream())
    events = first + rest
    assert events[-1].type == "synthesize-stopped" and events[-2].type == "audio-stop"
    check_audio(events)
    wait_idle(service)
    lines = request_lines(service, since)
    assert len(lines) == 3 and all("status=200" in line and "result=ok" in line for line in lines), lines


def test_text_chunks_without_synthesize_start_are_a_stream_too(service) -> None:
    async def unannounced() -> list[Event]:
        async with client(service) as tcp:
            await tcp.write_event(SynthesizeChunk(text="No start event. ").event())
            await tcp.write_event(SynthesizeChunk(text="Still spoken.").event())
            await tcp.write_event(SynthesizeStop().event())
            return await read_until(tcp, "synthesize-stopped")

    events = asyncio.run(unannounced())
    assert events[-1].type == "synthesize-stopped"
    pcm = check_audio(events)
    assert len(pcm) > 0 and len(pcm) % 2 == 0


def test_an_unknown_voice_is_an_error_event(service) -> None:
    async def unknown() -> tuple[list[Event], list[Event]]:
        async with client(service) as tcp:
            await tcp.write_event(Synthesize(text="你好。", voice=SynthesizeVoice(name="nobody")).event())
            single = await read_until(tcp, "error")
            await tcp.write_event(SynthesizeStart(voice=SynthesizeVoice(name="nobody")).event())
            await tcp.write_event(SynthesizeChunk(text="你好。").event())
            await tcp.write_event(SynthesizeStop().event())
            return single, await read_until(tcp, "synthesize-stopped")

    single, streamed = asyncio.run(unknown())
    error = Error.from_event(single[-1])
    assert error.code == "unknown-voice" and "nobody" in error.text and "default" in error.text
    assert [event.type for event in streamed] == ["error", "synthesize-stopped"]


def test_a_malformed_event_is_an_error_and_the_connection_goes_on(service) -> None:
    async def malformed() -> tuple[list[Event], list[Event]]:
        async with client(service) as tcp:
            await tcp.write_event(Event(type="synthesize", data={"voice": {"name": "default"}}))  # no text
            first = await read_until(tcp, "error")
            await tcp.write_event(Describe().event())
            return first, await read_until(tcp, "info")

    first, then = asyncio.run(malformed())
    assert Error.from_event(first[-1]).code == "bad-request" and "text" in Error.from_event(first[-1]).text
    assert then[-1].type == "info"


def test_a_client_that_leaves_cancels_its_synthesis(service) -> None:
    before = wait_idle(service)

    async def leave_early() -> None:
        async with client(service) as tcp:
            await tcp.write_event(Synthesize(text=SENTENCES * 4).event())
            await read_until(tcp, "audio-chunk")

    asyncio.run(leave_early())
    after = wait_idle(service, timeout=10)  # freed long before the text could have been spoken
    assert after["cancelled"] == before["cancelled"] + 1, after
