"""The Wyoming TTS server: Home Assistant's protocol (the Wyoming integration, and its satellites) on its own TCP port
(`[wyoming]`, 10200), running beside the HTTP API in the same process and on the same speech service, so the same
engine, voices, limits and cancellation apply. Built on the `wyoming` package's AsyncServer / AsyncEventHandler.

Events, per connection, in order:
- `describe` -> `info`: one TTS program (`cosyapp`) whose voices are `default` (the default prompt voice) and the
  registered speakers, each with the languages of the configured backend.
- `synthesize` {text, voice} -> `audio-start`, `audio-chunk`s as the audio is synthesized, `audio-stop`.
- streaming text: `synthesize-start` {voice}, `synthesize-chunk`s {text}, `synthesize-stop` -> one `audio-start`
  at the first audio, the audio of each segment (a sentence, cut by `text_segments.TextSegmenter`) as soon as the
  segment is complete, one `audio-stop`, then `synthesize-stopped`. One audio format for the whole stream. Text
  chunks without a `synthesize-start` open a stream with the default voice. A `synthesize` inside a stream is
  ignored: Home Assistant repeats the streamed text in one for servers that do not stream.
- a voice that is not one of those listed, text too long, a busy engine, ...: an `error` event {text, code}; a
  stream then drops its remaining text and still ends with `synthesize-stopped`.
A client that disconnects cancels its synthesis at once (its slot is freed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped,
                         SynthesizeVoice)

from cosyapp.audio import SAMPLE_WIDTH, to_s16le
from cosyapp.config import WyomingSettings
from cosyapp.engine.scheduler import EngineBusy
from cosyapp.server.audio_responses import rejected
from cosyapp.server.errors import as_api_error
from cosyapp.server.fields import check_length
from cosyapp.server.speech import NoAudio, SpeechRequest, SpeechService, VoiceReference
from cosyapp.server.text_segments import TextSegmenter

log = logging.getLogger("cosyapp.wyoming")

PROGRAM = "cosyapp"
DEFAULT_VOICE = "default"
ATTRIBUTION = Attribution(name="cosyapp", url="https://github.com/FunAudioLLM/CosyVoice")
# Languages each backend's released model speaks (Wyoming voices list them; Home Assistant filters voices by them).
LANGUAGES = {
    "cosyvoice2": ["zh", "en", "ja", "ko", "yue"],
    "cosyvoice3": ["zh", "en", "ja", "ko", "de", "es", "fr", "it", "ru", "yue"],
    "fish": ["en", "zh", "ja", "ko", "de", "fr", "es", "ar", "ru", "nl", "it", "pl", "pt"],
}
# Streamed text: a segment ends at each sentence end, or at a break before this many characters.
SEGMENT_CHARS = 300
# Audio per audio-chunk event, in seconds at most (satellites play small chunks as they come).
CHUNK_S = 0.1


def _version() -> str | None:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("cosyapp")
    return None


@dataclass
class TextStream:
    """One streamed-text synthesis: the voice it names, segments waiting to be spoken (None: the stream has stopped)."""

    voice: SynthesizeVoice | None
    segmenter: TextSegmenter
    segments: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)

    def add(self, text: str) -> None:
        for segment in self.segmenter.add(text):
            self.segments.put_nowait(segment)

    def stop(self) -> None:
        for segment in self.segmenter.flush():
            self.segments.put_nowait(segment)
        self.segments.put_nowait(None)


class SpeechError(Exception):
    """A synthesis failed in a way the client is told about (an `error` event)."""

    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.text, self.code = text, code


class TtsConnection(AsyncEventHandler):
    """One client connection. Events are read as they come (so a disconnect is seen at once); synthesis runs on one
    worker task per connection, requests in the order they came."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: WyomingServer) -> None:
        super().__init__(reader, writer)
        self.server = server
        self.jobs: asyncio.Queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._work())
        self.stream: TextStream | None = None

    async def handle_event(self, event: Event) -> bool:
        try:
            await self._handle(event)
        except (KeyError, TypeError, ValueError) as e:  # an event without its fields: say so, keep the connection
            await self.write_event(Error(text=f"malformed {event.type} event: {e!r}", code="bad-request").event())
        return True

    async def _handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self.write_event(self.server.info().event())
        elif Synthesize.is_type(event.type):
            if self.stream is None:  # inside a stream it repeats the streamed text (see the module docstring)
                request = Synthesize.from_event(event)
                self.jobs.put_nowait(lambda: self._speak_text(request.text, request.voice))
        elif SynthesizeStart.is_type(event.type):
            self._end_stream()
            self._open_stream(SynthesizeStart.from_event(event).voice)
        elif SynthesizeChunk.is_type(event.type):
            if self.stream is None:
                self._open_stream(None)
            self.stream.add(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(event.type):
            if self.stream is None:
                self.jobs.put_nowait(lambda: self.write_event(SynthesizeStopped().event()))
            self._end_stream()

    async def disconnect(self) -> None:
        self.worker.cancel()  # cancels the synthesis in progress, which frees its engine slot
        with contextlib.suppress(asyncio.CancelledError):
            await self.worker

    def _open_stream(self, voice: SynthesizeVoice | None) -> None:
        limit = min(SEGMENT_CHARS, self.server.speech.state.settings.limits.max_text_chars)
        self.stream = stream = TextStream(voice, TextSegmenter(0, limit))
        self.jobs.put_nowait(lambda: self._speak_stream(stream))

    def _end_stream(self) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.stream = None

    async def _work(self) -> None:
        while True:
            job = await self.jobs.get()
            try:
                await job()
            except ConnectionError:  # the client left mid-answer (its synthesis is cancelled): nothing more to send
                return

    # ---- synthesis -------------------------------------------------------------------------------

    async def _speak_text(self, text: str, voice: SynthesizeVoice | None) -> None:
        """A `synthesize` request: its audio between one audio-start and one audio-stop."""
        try:
            reference = self.server.voice(voice)
            check_length(text, self.server.speech.state.settings.limits.max_text_chars, "text")
            audio = Audio(self)
            await self._speak(text.strip(), reference, audio)
            await audio.stop()
        except Exception as e:
            await self._report(e)

    async def _speak_stream(self, stream: TextStream) -> None:
        """A streamed text: every segment's audio as it is made, one audio-start/-stop pair, synthesize-stopped."""
        audio = Audio(self)
        try:
            voice = self.server.voice(stream.voice)
            while (segment := await stream.segments.get()) is not None:
                await self._speak(segment, voice, audio)
            await audio.stop()
        except Exception as e:
            await self._report(e)
            while await stream.segments.get() is not None:  # the rest of the text is dropped
                pass
        await self.write_event(SynthesizeStopped().event())

    async def _speak(self, text: str, voice: VoiceReference, audio: Audio) -> None:
        if not text:
            return
        service = self.server.speech
        record = service.record()
        try:
            speech = await service.start(SpeechRequest(text=text, voice=voice), record)
        except NoAudio:
            record.finish(200, "no audio")
            return  # nothing speakable (only punctuation): nothing to send
        except Exception as e:
            raise rejected(e, record, {}) from None  # logged; unexpected errors are raised as they are
        result = "cancelled"
        try:
            await audio.send(speech.first, speech.sample_rate)
            record.audio_samples += speech.first.shape[0]
            async for chunk in speech.stream:
                await audio.send(chunk, speech.sample_rate)
                record.audio_samples += chunk.shape[0]
            result = "ok"
        except Exception as e:
            result = f"failed({type(e).__name__}: {e})"
            raise
        finally:
            speech.stream.cancel()
            record.finish(200, result)

    async def _report(self, error: Exception) -> None:
        """An `error` event for an expected failure; unexpected ones are logged and reported without detail."""
        api_error = as_api_error(error)
        if isinstance(error, SpeechError):
            text, code = error.text, error.code
        elif api_error is not None:  # a full engine, a model still loading, text too long, ...
            text = api_error.detail
            code = "busy" if isinstance(error, EngineBusy) else "unavailable" if api_error.status_code >= 500 \
                else "bad-request"
        else:
            log.error("wyoming synthesis failed", exc_info=error)
            text, code = "internal error; see the service log", "internal-error"
        await self.write_event(Error(text=text, code=code).event())


class Audio:
    """The audio events of one request: audio-start before the first chunk (its format holds for the whole request;
    sent even when there is no audio, so the client always gets a format), chunks of at most CHUNK_S, audio-stop."""

    def __init__(self, connection: TtsConnection) -> None:
        self.connection = connection
        self.rate: int | None = None

    async def send(self, samples: np.ndarray, rate: int) -> None:
        await self._start(rate)
        step = max(1, int(rate * CHUNK_S))
        for begin in range(0, samples.shape[0], step):
            chunk = AudioChunk(rate=rate, width=SAMPLE_WIDTH, channels=1, audio=to_s16le(samples[begin:begin + step]))
            await self.connection.write_event(chunk.event())

    async def stop(self) -> None:
        await self._start(self.connection.server.sample_rate())
        await self.connection.write_event(AudioStop().event())

    async def _start(self, rate: int) -> None:
        if self.rate is None:
            self.rate = rate
            await self.connection.write_event(AudioStart(rate=rate, width=SAMPLE_WIDTH, channels=1).event())
        elif rate != self.rate:  # one format per request: a backend never changes its rate
            raise SpeechError(f"audio at {rate} Hz in a stream at {self.rate} Hz", "internal-error")


class WyomingServer:
    """The TCP server, started and stopped with the app (app.py's lifespan)."""

    def __init__(self, settings: WyomingSettings, speech: SpeechService) -> None:
        self.settings = settings
        self.speech = speech
        self.server = AsyncTcpServer(settings.host, settings.port)

    async def start(self) -> None:
        try:
            await self.server.start(lambda reader, writer: TtsConnection(reader, writer, self))
        except OSError as e:  # stops the start-up, naming the setting to change
            raise OSError(e.errno, f"the Wyoming server cannot listen on {self.settings.host}:{self.settings.port} "
                                   f"([wyoming] host and port): {e.strerror}") from None
        log.info("Wyoming TTS server listening on tcp://%s:%d", self.settings.host, self.settings.port)

    async def stop(self) -> None:
        await self.server.stop()

    def sample_rate(self) -> int:
        """The rate of the audio: the configured backend's (from its engine once loaded)."""
        return self.speech.state.ready_engine().info.sample_rate

    def voice(self, voice: SynthesizeVoice | None) -> VoiceReference:
        """The voice a request names: `default` (or none, or only a language) is the default prompt voice, any other
        name a registered speaker; an unknown name is an error."""
        name = voice.name if voice is not None else None
        if not name or name == DEFAULT_VOICE:
            return VoiceReference()
        if name not in self.speech.state.speakers.ids():
            raise SpeechError(f"unknown voice {name!r}; voices: {', '.join(self.voice_names())}", "unknown-voice")
        return VoiceReference(speaker=name)

    def voice_names(self) -> list[str]:
        return [DEFAULT_VOICE, *self.speech.state.speakers.ids()]

    def info(self) -> Info:
        backend = self.speech.state.settings.model.backend
        languages = LANGUAGES.get(backend, [])
        voices = [TtsVoice(name=name, description="the default prompt voice" if name == DEFAULT_VOICE else
                           f"registered speaker {name}", attribution=ATTRIBUTION, installed=True, version=None,
                           languages=languages) for name in self.voice_names()]
        program = TtsProgram(name=PROGRAM, description=f"cosyapp streaming text to speech ({backend})",
                             attribution=ATTRIBUTION, installed=True, version=_version(), voices=voices,
                             supports_synthesize_streaming=True)
        return Info(tts=[program])

