"""What the routes share: settings, one engine per loaded backend, and where prompt voices come from."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

from cosyapp.audio import check_duration, decode_audio, read_audio_file
from cosyapp.backends.weights import resolve_device
from cosyapp.config import AUTO, Settings
from cosyapp.engine.registry import load_backend
from cosyapp.engine.scheduler import Engine
from cosyapp.engine.sizing import auto_max_concurrent
from cosyapp.engine.types import InputError, Mode, SynthesisRequest, Voice
from cosyapp.server.errors import ApiError
from cosyapp.voices import DefaultPromptStore, SpeakerRegistry, StoredVoice, load_voice, make_voice_files

log = logging.getLogger("cosyapp.server")

WARMUP_TEXT = "你好。"
# Tokens (CosyVoice2) or frames (Fish) of the warm-up synthesis: enough for the first chunk and the next hops'
# shapes; a fixed length, so a model that does not stop soon (random weights never do) cannot hold start-up.
WARMUP_TOKENS = 80


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status = "loading"  # -> "ok" once every backend is loaded and warmed up, or "error" (see self.error)
        self.error: str | None = None
        self.backends = settings.served_backends()  # name -> model dir, [model] backend first
        self.engines: dict[str, Engine] = {}
        self.speakers = SpeakerRegistry(settings.storage.speakers_dir)
        self.default_prompt = DefaultPromptStore(settings.storage.default_prompt_dir)

    @property
    def engine(self) -> Engine | None:
        """The engine of `[model] backend` (None until loaded)."""
        return self.engines.get(self.settings.model.backend)

    def ready_engine(self, backend: str | None = None) -> Engine:
        """The engine of `backend` (default: `[model] backend`), a 400 when the service does not load that
        backend, or a 503 that says why there is none yet."""
        name = backend or self.settings.model.backend
        if name not in self.backends:
            raise ApiError(400, f"backend {name!r} is not loaded by this service; loaded: {', '.join(self.backends)}")
        engine = self.engines.get(name)
        if self.status == "ok" and engine is not None:
            return engine
        if self.status == "error":
            raise ApiError(503, f"model failed to load: {self.error}")
        raise ApiError(503, "model is loading; retry shortly", {"Retry-After": "5"})

    async def load(self) -> None:
        """Load every backend off the event loop (one engine each), warm them up, then report ready. Never raises."""
        model = self.settings.model
        started = time.perf_counter()
        streams = self.stream_slots()
        for name, model_dir in self.backends.items():
            try:
                engine_settings = self.settings.engine
                backend = await asyncio.to_thread(load_backend, name, model_dir, model.device, model.dtype,
                                                  streams, **self.settings.backend_options(name))
                info = backend.info()
                log.info("Loaded model type: %s from %s (%.1f s)", info.model_type, info.model_dir,
                         time.perf_counter() - started)
                engine = Engine(backend, streams, engine_settings.max_queue,
                                engine_settings.retry_after_s, engine_settings.voice_cache_size)
                self.engines[name] = engine
                if model.warmup:
                    await self._warm_up(engine)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.status, self.error = "error", f"{type(e).__name__}: {e}"
                log.error("model failed to load from %s: %s", model_dir, self.error, exc_info=e)
                return
        self.status = "ok"
        log.info("ready (%.1f s after start)", time.perf_counter() - started)

    def stream_slots(self) -> int:
        """`[engine] max_concurrent`, sized from the hardware when it is "auto" (said in the log)."""
        setting = self.settings.engine.max_concurrent
        if setting != AUTO:
            return int(setting)
        streams, reason = auto_max_concurrent(resolve_device(self.settings.model.device),
                                              list(self.backends.values()))
        log.info("max_concurrent auto: %d streams at once (%s)", streams, reason)
        return streams

    async def _warm_up(self, engine: Engine) -> None:
        try:
            voice = await self.default_voice(engine)
        except InputError as e:
            log.warning("skipping warm-up: %s", e)
            return
        instruction = self.default_instruction(engine)
        mode = Mode.INSTRUCT2 if instruction else Mode.CROSS_LINGUAL
        request = SynthesisRequest(text=WARMUP_TEXT, voice=voice, mode=mode, instruction=instruction or None,
                                   fixed_length=WARMUP_TOKENS)
        started = time.perf_counter()
        stream = await engine.start(request, engine.admit())
        async for _ in stream:
            pass
        log.info("warm-up synthesis done in %.2f s", time.perf_counter() - started)

    def default_instruction(self, engine: Engine) -> str:
        """The instruction of requests that give none ("" when unset or when the model has no instruct2 mode:
        such requests then use the cross-lingual mode)."""
        if Mode.INSTRUCT2.value not in engine.info.modes:
            return ""
        stored = self.default_prompt.get()
        if stored is not None and stored.meta.get("instruction"):
            return stored.meta["instruction"]
        return self.settings.defaults.instruction

    async def default_voice(self, engine: Engine) -> Voice:
        """The default prompt voice: `prompts set-default` if set, else the config's prompt_wav."""
        stored = self.default_prompt.get()
        if stored is not None:
            return await engine.voice(f"default:{stored.path}:{stored.version}",
                                      lambda: load_voice(stored, engine.backend))
        path = self.settings.defaults.prompt_wav
        try:
            version = path.stat().st_mtime_ns
        except OSError:
            raise InputError(f"No prompt_wav provided and default file not found: {path}. Upload prompt_wav, "
                             "name a speaker, or set a default with `cosyapp prompts set-default`") from None
        return await engine.voice(f"default:{path}:{version}", lambda: self._prepare_file(engine, path))

    def _prepare_file(self, engine: Engine, path: Path) -> Voice:
        samples, sample_rate = read_audio_file(path)
        return engine.backend.prepare_voice(samples, sample_rate, None)

    async def upload_voice(self, engine: Engine, data: bytes) -> Voice:
        """A voice from an uploaded recording, cached by the file's content hash."""
        limits = self.settings.limits

        def prepare() -> Voice:
            samples, sample_rate = decode_audio(data)
            check_duration(samples, sample_rate, limits.min_prompt_s, limits.max_prompt_s)
            return engine.backend.prepare_voice(samples, sample_rate, None)

        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())  # up to MBs: off the loop
        return await engine.voice(f"upload:{digest}", prepare)

    async def add_speaker(self, engine: Engine, speaker_id: str, data: bytes, text: str | None, what: str,
                          meta: dict[str, str], taken: str) -> StoredVoice:
        """Register an uploaded recording (`what` names it in errors) as speaker `speaker_id`, its features computed
        with `engine`'s model off the event loop: 400 for audio that cannot be a prompt, 409 `taken` when the id
        is registered already (also when another request registered it meanwhile)."""
        limits = self.settings.limits

        def store() -> StoredVoice:
            samples, sample_rate = decode_audio(data, what)
            check_duration(samples, sample_rate, limits.min_prompt_s, limits.max_prompt_s, what)
            files = make_voice_files(engine.backend, samples, sample_rate, text, meta)
            try:
                return self.speakers.add(speaker_id, files)
            except InputError:
                raise ApiError(409, taken) from None

        if speaker_id in self.speakers.ids():
            raise ApiError(409, taken)
        return await asyncio.to_thread(store)

    async def speaker_voice(self, engine: Engine, speaker_id: str) -> tuple[Voice, StoredVoice]:
        stored = self.speakers.get(speaker_id)  # InputError for a bad or unknown id
        voice = await engine.voice(f"speaker:{stored.path}:{stored.version}",
                                   lambda: load_voice(stored, engine.backend))
        return voice, stored
