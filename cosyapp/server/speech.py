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
from typing import Any, Callable, Mapping, cast

import numpy as np

from cosyapp.audio import check_duration, decode_audio, read_audio_file
from cosyapp.engine.engine import Engine, SynthesisStream
from cosyapp.engine.scheduler import Admission
from cosyapp.engine.types import Codec, InputError, Mode, ReferenceVoices, SynthesisRequest, Voice
from cosyapp.server.errors import ApiError
from cosyapp.server.fields import check_length
from cosyapp.server.metrics import Metrics
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.resample import ResampledStream
from cosyapp.server.state import ServiceState
from cosyapp.voices import load_voice

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
    sample_rate: int | None = None  # the rate to send (resampled while streaming); None: the backend's own


@dataclass
class Speech:
    """A started synthesis: its first chunk is here, the rest comes from `stream` (the caller owns it), all at
    `sample_rate` (the one the request asked for, else the backend's)."""

    stream: SynthesisStream | ResampledStream
    first: np.ndarray
    sample_rate: int

    async def whole(self) -> np.ndarray:
        """All of the audio; the stream is cancelled however this ends."""
        try:
            return np.concatenate([self.first, *[chunk async for chunk in self.stream]])
        finally:
            self.stream.cancel()


@dataclass(frozen=True)
class ResolvedVoice:
    voice: Voice
    transcript: str | None  # what its one recording says, when known
    transcribed: bool = False  # transcripts are held by the voice itself (several references)


def choose_mode(instruction: str | None, resolved: ResolvedVoice, default_instruction: str
                ) -> tuple[Mode, str | None, str | None]:
    """(mode, instruction, prompt_text) by the rules in the module docstring; `default_instruction` is "" unless
    the request names no voice and the model takes instructions."""
    if instruction or (default_instruction and not resolved.transcript):
        return Mode.INSTRUCT2, instruction or default_instruction, None
    if resolved.transcript or resolved.transcribed:
        return Mode.ZERO_SHOT, None, resolved.transcript or None
    return Mode.CROSS_LINGUAL, None, None


def check_text_lengths(request: SpeechRequest, limit: int) -> None:
    """The one text-length rule of every API, applied where they all meet: the text, the instruction and every
    transcript at most `limit` characters (the adapters check their own fields by their names first)."""
    check_length(request.text, limit, "text")
    check_length(request.instruction or "", limit, "instruction")
    check_length(request.voice.transcript or "", limit, "the voice's transcript")
    for recording in request.voice.recordings:
        check_length(recording.text or "", limit, f"the transcript of {recording.what}")


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
        check_text_lengths(request, self.state.settings.limits.max_text_chars)
        options = engine.backend.parse_options(request.options)  # a bad option costs no engine place
        sample_rate = request.sample_rate or engine.info.sample_rate
        if admission is None:
            admission = engine.admit()
        try:
            voice, mode, instruction, prompt_text = await self._voice_and_mode(engine, request)
            if record is not None:
                record.describe(engine.backend.name, sample_rate, mode.value, len(request.text))
            synthesis = SynthesisRequest(text=request.text, voice=voice, mode=mode, instruction=instruction,
                                         prompt_text=prompt_text, stream=request.stream, seed=request.seed,
                                         fixed_length=request.fixed_length, options=options,
                                         stats=record.stages if record is not None else None)
            stream = await engine.start(synthesis, admission)
        except BaseException:
            admission.release()  # start() never ran or failed: give the place back
            raise
        if sample_rate != engine.info.sample_rate:
            stream = ResampledStream(stream, engine.info.sample_rate, sample_rate)
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
        return Speech(stream, first, sample_rate)

    # ---- voices -----------------------------------------------------------------------------------

    async def _voice_and_mode(self, engine: Engine, request: SpeechRequest
                              ) -> tuple[Voice, Mode, str | None, str | None]:
        """(voice, mode, instruction, prompt_text) by the rules in the module docstring."""
        info = engine.info
        if request.instruction and not info.instruct:
            raise ApiError(400, f"the {info.model_type} model takes no 'instruction' (no instruct2 mode); send a "
                                "reference recording with its transcript, or a speaker, to choose the voice")
        resolved = await self.resolve_voice(engine, request.voice)
        default_instruction = self.state.default_instruction(engine) if request.voice.default else ""
        mode, instruction, transcript = choose_mode(request.instruction, resolved, default_instruction)
        if mode.value not in info.modes:
            raise ApiError(400, f"the {info.model_type} model does not support the {mode.value} mode; "
                                f"supported: {', '.join(info.modes)}")
        voice = replace(resolved.voice, text=transcript) if transcript else resolved.voice
        return voice, mode, instruction, transcript

    async def resolve_voice(self, engine: Engine, reference: VoiceReference) -> ResolvedVoice:
        """The prepared voice `reference` names, from the voice cache when it was prepared before."""
        if reference.speaker is not None:
            stored = self.state.speakers.get(reference.speaker)  # InputError for a bad or unknown id
            voice = await engine.voice(voice_key("speaker", stored.key, stored.version),
                                       lambda: load_voice(stored, engine.backend))
            return ResolvedVoice(voice, reference.transcript or stored.text)
        if len(reference.recordings) == 1:
            (recording,) = reference.recordings
            return ResolvedVoice(await self._recording_voice(engine, recording), reference.transcript or recording.text)
        if reference.recordings:
            return ResolvedVoice(await self._references_voice(engine, reference.recordings), reference.transcript,
                                 transcribed=any(recording.text for recording in reference.recordings))
        if reference.model_voice:
            return ResolvedVoice(self._reference_voices(engine).no_reference_voice(), reference.transcript)
        return ResolvedVoice(await self.default_voice(engine), reference.transcript)

    @staticmethod
    def _reference_voices(engine: Engine) -> ReferenceVoices:
        """The backend's voices of several references or of none, which it must have declared."""
        if not engine.info.reference_voices:
            raise ApiError(400, f"the {engine.info.model_type} model needs one reference recording (or a speaker)")
        return cast(ReferenceVoices, engine.backend)

    async def _references_voice(self, engine: Engine, recordings: tuple[Recording, ...]) -> Voice:
        """One voice of several recordings, each read as its own transcript."""
        backend = self._reference_voices(engine)
        voices = [await self._recording_voice(engine, recording) for recording in recordings]
        return backend.combine_voices(voices, [recording.text or "" for recording in recordings])

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
            return await engine.voice(voice_key("default", stored.key, stored.version),
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
        codec = cast(Codec, engine.backend)

        def encode() -> list[np.ndarray]:
            return [codec.encode_codes(*decode_audio(recording.audio, recording.what)) for recording in recordings]

        return await engine.run(encode, engine.admit())

    async def decode_codes(self, backend: str, grids: list[np.ndarray]) -> list[np.ndarray]:
        """Audio (mono float32 at the backend's rate) of each code grid, computed in an engine slot."""
        engine = self.state.ready_engine(backend)
        self.codec_codebooks(backend)
        codec = cast(Codec, engine.backend)
        return await engine.run(lambda: [codec.decode_codes(grid) for grid in grids], engine.admit())


def _file_voice(engine: Engine, path: Path) -> Voice:
    samples, sample_rate = read_audio_file(path)
    return engine.backend.prepare_voice(samples, sample_rate, None)
