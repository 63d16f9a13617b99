"""The speech service: the one path from a request, whichever API it came through, to running audio.

Every adapter (routes/*.py) translates its wire format into a `SpeechRequest` and hands it to
`SpeechService.start`, which takes a place in the engine, resolves the voice, chooses the mode, starts the
synthesis and waits for its first chunk, so that every error up to the first audio is still answered with an
error status; the request's `RequestRecord` writes its log line and metrics. Codec work (`encode_codes`,
`decode_codes`) takes an engine place the same way.

Voices, whatever the API calls them: a registered speaker (its stored features), uploaded or inline recordings
(prepared once, cached by content hash), no reference at all (the model's own voice, where the backend has
one), or else the default prompt voice. Mode: an instruction -> instruct2; else a transcript (given, stored with
the speaker, or with the recordings) -> zero_shot; else a voice given -> cross_lingual; else the default
instruction (instruct2) with the default voice, or cross_lingual where there is none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from cosyapp.audio import check_duration, decode_audio, read_audio_file
from cosyapp.engine.scheduler import Admission, Engine, SynthesisStream
from cosyapp.engine.types import InputError, Mode, SynthesisRequest, Voice
from cosyapp.server.errors import ApiError
from cosyapp.server.metrics import Metrics
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.state import ServiceState
from cosyapp.voices import StoredVoice, load_voice

log = logging.getLogger("cosyapp.server")

WARMUP_TEXT = "你好。"
# Tokens (CosyVoice2) or frames (Fish) of the warm-up synthesis: enough for the first chunk and the next hops'
# shapes; a fixed length, so a model that does not stop soon (random weights never do) cannot hold start-up.
WARMUP_TOKENS = 80


class NoAudio(ApiError):
    """The text made no audio (nothing speakable in it)."""

    def __init__(self) -> None:
        super().__init__(400, "No audio generated, please check the input text")


@dataclass(frozen=True)
class Recording:
    """A recording sent with the request (an upload or inline audio); `what` names it in errors."""

    audio: bytes
    what: str
    text: str | None = None  # its transcript, where the API takes one per recording


@dataclass(frozen=True)
class VoiceReference:
    """Where the voice comes from: a registered speaker, else recordings, else no reference (`model_voice`: the
    model's own voice), else the default prompt voice. `transcript` is what the voice's recording says (it
    overrides a speaker's stored transcript)."""

    speaker: str | None = None
    recordings: tuple[Recording, ...] = ()
    model_voice: bool = False
    transcript: str | None = None

    @property
    def default(self) -> bool:
        return self.speaker is None and not self.recordings and not self.model_voice


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: VoiceReference = VoiceReference()
    instruction: str | None = None
    # Backend options by the backend's names (`BackendInfo.options`); the backend parses and checks them.
    options: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = True  # False: the backend may make the audio in one piece (Fish: upstream's single decode)
    seed: int | None = None
    fixed_length: int | None = None  # benchmarks: exactly this many LM tokens per sentence
    backend: str | None = None  # None: [model] backend


@dataclass
class Speech:
    """A started synthesis: its first chunk is here, the rest comes from `stream` (the caller owns it)."""

    stream: SynthesisStream
    first: np.ndarray
    sample_rate: int

    async def whole(self) -> np.ndarray:
        """All of the audio; the stream is cancelled however this ends."""
        try:
            return np.concatenate([self.first, *[chunk async for chunk in self.stream]])
        finally:
            self.stream.cancel()


def voice_key(kind: str, *identity: object) -> str:
    """The voice cache's key: what kind of voice, and what identifies its content."""
    return ":".join((kind, *map(str, identity)))


class SpeechService:
    def __init__(self, state: ServiceState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    def record(self, label: str | None = None) -> RequestRecord:
        """The log line and metrics of a new request (`label`: of a session, see RequestRecord)."""
        return RequestRecord(uuid.uuid4().hex[:12], self.metrics, label)

    def admit(self, request: SpeechRequest) -> Admission:
        """A place in the engine of `request` taken ahead of `start` (503 when busy), for work that starts later."""
        return self.state.ready_engine(request.backend).admit()

    def parse_options(self, request: SpeechRequest) -> Any:
        """`request`'s backend options, typed and checked by its backend (400 naming a bad one)."""
        return self.state.ready_engine(request.backend).backend.parse_options(request.options)

    async def start(self, request: SpeechRequest, record: RequestRecord | None = None,
                    admission: Admission | None = None, on_slot: Callable[[], None] | None = None) -> Speech:
        """Admit `request` (or use `admission`), resolve its voice and mode, start it and wait for its first chunk.
        Errors up to the first audio are raised (the adapter answers them); the caller owns the stream after.
        `on_slot` is called once the synthesis holds a slot (a synthesis made in one piece has its first audio
        only at its end)."""
        return await self._start(self.state.ready_engine(request.backend), request, record, admission, on_slot)

    async def warm_up(self, engine: Engine) -> None:
        """One short synthesis with the default voice, so the first request finds everything compiled and cached."""
        started = time.perf_counter()
        try:
            speech = await self._start(engine, SpeechRequest(WARMUP_TEXT, fixed_length=WARMUP_TOKENS))
        except InputError as e:
            log.warning("skipping warm-up: %s", e)
            return
        await speech.whole()
        log.info("warm-up synthesis done in %.2f s", time.perf_counter() - started)

    async def _start(self, engine: Engine, request: SpeechRequest, record: RequestRecord | None = None,
                     admission: Admission | None = None, on_slot: Callable[[], None] | None = None) -> Speech:
        options = engine.backend.parse_options(request.options)  # a bad option costs no engine place
        if admission is None:
            admission = engine.admit()
        try:
            voice, mode, instruction, prompt_text = await self._voice_and_mode(engine, request)
            if record is not None:
                record.describe(engine.backend.name, engine.info.sample_rate, mode.value, len(request.text))
            synthesis = SynthesisRequest(text=request.text, voice=voice, mode=mode, instruction=instruction,
                                         prompt_text=prompt_text, stream=request.stream, seed=request.seed,
                                         fixed_length=request.fixed_length, options=options,
                                         stats=record.stages if record is not None else None)
            stream = await engine.start(synthesis, admission)
        except BaseException:
            admission.release()  # start() never ran or failed: give the place back
            raise
        try:
            if on_slot is not None:
                on_slot()
            first = await anext(stream, None)  # backend errors up to here still become a 4xx
            if first is None:
                raise NoAudio()
        except BaseException:
            stream.cancel()
            raise
        if record is not None:
            record.first_audio()
        return Speech(stream, first, engine.info.sample_rate)

    # ---- voices -----------------------------------------------------------------------------------

    async def _voice_and_mode(self, engine: Engine, request: SpeechRequest
                              ) -> tuple[Voice, Mode, str | None, str | None]:
        """(voice, mode, instruction, prompt_text) by the rules in the module docstring."""
        info, reference = engine.info, request.voice
        if request.instruction and not info.instruct:
            raise ApiError(400, f"the {info.model_type} model takes no 'instruction' (no instruct2 mode); send a "
                                "reference recording with its transcript, or a speaker, to choose the voice")
        transcript = reference.transcript
        spoken_in_voice = False  # transcripts held by the voice itself (several recordings)
        if reference.speaker is not None:
            voice, stored = await self._speaker_voice(engine, reference.speaker)
            transcript = transcript or stored.text
        elif reference.recordings:
            voice = await self._recordings_voice(engine, reference.recordings)
            if len(reference.recordings) == 1:
                transcript = transcript or reference.recordings[0].text
            else:
                spoken_in_voice = any(recording.text for recording in reference.recordings)
        elif reference.model_voice:
            if not info.reference_voices:
                raise ApiError(400, f"the {info.model_type} model has no voice of its own: send a reference voice")
            voice = engine.backend.no_reference_voice()
        else:
            voice = await self.default_voice(engine)

        default_instruction = self.state.default_instruction(engine) if reference.default else ""
        if request.instruction or (not transcript and default_instruction):
            mode, instruction, transcript = Mode.INSTRUCT2, request.instruction or default_instruction, None
        else:
            mode = Mode.ZERO_SHOT if transcript or spoken_in_voice else Mode.CROSS_LINGUAL
            instruction = None
        if mode.value not in info.modes:
            raise ApiError(400, f"the {info.model_type} model does not support the {mode.value} mode; "
                                f"supported: {', '.join(info.modes)}")
        if transcript:
            voice = replace(voice, text=transcript)
        return voice, mode, instruction, transcript or None

    async def _speaker_voice(self, engine: Engine, speaker_id: str) -> tuple[Voice, StoredVoice]:
        stored = self.state.speakers.get(speaker_id)  # InputError for a bad or unknown id
        voice = await engine.voice(voice_key("speaker", stored.path, stored.version),
                                   lambda: load_voice(stored, engine.backend))
        return voice, stored

    async def _recordings_voice(self, engine: Engine, recordings: tuple[Recording, ...]) -> Voice:
        if len(recordings) > 1 and not engine.info.reference_voices:
            raise ApiError(400, f"the {engine.info.model_type} model takes one reference recording; got "
                                f"{len(recordings)}")
        voices = [await self._recording_voice(engine, recording) for recording in recordings]
        if len(voices) == 1:
            return voices[0]
        return engine.backend.combine_voices(voices, [recording.text or "" for recording in recordings])

    async def _recording_voice(self, engine: Engine, recording: Recording) -> Voice:
        """A prompt voice from a recording, cached by its content hash."""
        limits = self.state.settings.limits

        def prepare() -> Voice:
            samples, sample_rate = decode_audio(recording.audio, recording.what)
            check_duration(samples, sample_rate, limits.min_prompt_s, limits.max_prompt_s, recording.what)
            return engine.backend.prepare_voice(samples, sample_rate, None)

        digest = await asyncio.to_thread(lambda: hashlib.sha256(recording.audio).hexdigest())  # MBs: off the loop
        return await engine.voice(voice_key("recording", digest), prepare)

    async def default_voice(self, engine: Engine) -> Voice:
        """The default prompt voice: `prompts set-default` if set, else the config's prompt_wav."""
        stored = self.state.default_prompt.get()
        if stored is not None:
            return await engine.voice(voice_key("default", stored.path, stored.version),
                                      lambda: load_voice(stored, engine.backend))
        path = self.state.settings.defaults.prompt_wav
        try:
            version = path.stat().st_mtime_ns
        except OSError:
            raise InputError(f"No prompt_wav provided and default file not found: {path}. Upload prompt_wav, "
                             "name a speaker, or set a default with `cosyapp prompts set-default`") from None
        return await engine.voice(voice_key("default", path, version), lambda: _file_voice(engine, path))

    # ---- codec ------------------------------------------------------------------------------------

    def codec_codebooks(self, backend: str) -> int:
        """How many codebooks the codec of `backend` has; a 400 when it has none."""
        info = self.state.ready_engine(backend).info
        if not info.codec_codebooks:
            raise ApiError(400, f"the {info.model_type} model has no codec")
        return info.codec_codebooks

    async def encode_codes(self, backend: str, recordings: list[Recording]) -> list[np.ndarray]:
        """Codec codes `[codebooks, frames]` of each recording, computed in an engine slot."""
        engine = self.state.ready_engine(backend)
        self.codec_codebooks(backend)

        def encode() -> list[np.ndarray]:
            return [engine.backend.encode_codes(*decode_audio(recording.audio, recording.what))
                    for recording in recordings]

        return await self._run(engine, encode)

    async def decode_codes(self, backend: str, grids: list[np.ndarray]) -> list[np.ndarray]:
        """Audio (mono float32 at the backend's rate) of each code grid, computed in an engine slot."""
        engine = self.state.ready_engine(backend)
        self.codec_codebooks(backend)
        return await self._run(engine, lambda: [engine.backend.decode_codes(grid) for grid in grids])

    @staticmethod
    async def _run(engine: Engine, work: Callable[[], Any]) -> Any:
        return await engine.run(work, engine.admit())


def _file_voice(engine: Engine, path: Path) -> Voice:
    samples, sample_rate = read_audio_file(path)
    return engine.backend.prepare_voice(samples, sample_rate, None)
