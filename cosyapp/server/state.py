"""What the routes share: settings, one engine per loaded backend (loaded and warmed up in the background), the
store (cosyapp/storage/) with the speaker registry and the default prompt."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from cosyapp.audio import check_duration, decode_audio
from cosyapp.backends.weights import resolve_device
from cosyapp.config import AUTO, Settings
from cosyapp.engine.registry import load_backend
from cosyapp.engine.engine import Engine
from cosyapp.engine.sizing import auto_max_concurrent
from cosyapp.engine.types import InputError
from cosyapp.server.errors import ApiError
from cosyapp.server.fields import check_length
from cosyapp.storage import StoredVoice, open_store
from cosyapp.voices import make_voice_files, validate_speaker_id

log = logging.getLogger("cosyapp.server")


class ServiceState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.status = "loading"  # -> "ok" once every backend is loaded and warmed up, or "error" (see self.error)
        self.error: str | None = None
        self.backends = settings.served_backends()  # name -> model dir, [model] backend first
        self.engines: dict[str, Engine] = {}
        self.store = open_store(settings.storage)  # the local disk, or a cluster's shared store
        self.speakers = self.store.speakers
        self.default_prompt = self.store.default_prompt

    @property
    def engine(self) -> Engine | None:
        """The engine of `[model] backend` (None until loaded)."""
        return self.engines.get(self.settings.model.backend)

    def not_ready(self) -> dict[str, str]:
        """What a health check answers (with a 503) before the service is ready: loading, or the error."""
        body = {"status": self.status}
        if self.error:
            body["detail"] = self.error
        return body

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

    async def load(self, warm_up: Callable[[Engine], Awaitable[None]]) -> None:
        """Load every backend off the event loop (one engine each), `warm_up` each (when configured), then report
        ready. Never raises."""
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
                    await warm_up(engine)
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

    def default_instruction(self, engine: Engine) -> str:
        """The instruction of requests that give none ("" when unset or when the model has no instruct2 mode:
        such requests then use the cross-lingual mode)."""
        if not engine.info.instruct:
            return ""
        stored = self.default_prompt.get()
        if stored is not None and stored.meta.get("instruction"):
            return stored.meta["instruction"]
        return self.settings.defaults.instruction

    async def add_speaker(self, engine: Engine, speaker_id: str, data: bytes, text: str | None, what: str,
                          meta: dict[str, str], taken: str) -> StoredVoice:
        """Register an uploaded recording (`what` names it in errors) as speaker `speaker_id`, its features computed
        with `engine`'s model off the event loop: 400 for audio that cannot be a prompt, 409 `taken` when the id
        is registered already (also when another request registered it meanwhile)."""
        limits = self.settings.limits
        if text:
            check_length(text, limits.max_text_chars, "the transcript")

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

    async def remove_speaker(self, speaker_id: str, not_found: str) -> None:
        """Delete a registered speaker (off the event loop): 400 for an invalid id, 404 `not_found` when unknown."""
        validate_speaker_id(speaker_id)
        if speaker_id not in self.speakers.ids():
            raise ApiError(404, not_found)
        try:
            await asyncio.to_thread(self.speakers.remove, speaker_id)
        except InputError:
            raise ApiError(404, not_found) from None  # another request removed it meanwhile
