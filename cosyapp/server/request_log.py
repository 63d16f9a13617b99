"""One log line per request (however it ends), and the request's share of the service metrics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from cosyapp.engine.stats import StageTimes

if TYPE_CHECKING:
    from cosyapp.server.metrics import Metrics

log = logging.getLogger("cosyapp.request")


class RequestRecord:
    """Timing of one request (or one live session), written as one log line and into the metrics when it ends.

    `label` names a session of several syntheses in the log instead of a synthesis mode (e.g. fish_live)."""

    def __init__(self, request_id: str, metrics: Metrics | None = None, label: str | None = None) -> None:
        self.id = request_id
        self.metrics = metrics
        self.session = label is not None
        self.started = time.perf_counter()
        self.mode = label or "-"
        self.backend = "-"
        self.text_chars = 0
        self.ttfb_s: float | None = None
        self.audio_samples = 0
        self.sample_rate = 0
        self.stages: StageTimes | None = None  # the engine's stage times of this request, when metrics want them
        self._done = False

    def describe(self, backend: str, sample_rate: int, mode: str, text_chars: int) -> None:
        """What the request synthesizes (a session keeps its label, and counts its text as it comes)."""
        self.backend, self.sample_rate = backend, sample_rate
        if self.stages is None and self.metrics is not None:
            self.stages = self.metrics.stage_times(backend)
        if not self.session:
            self.mode, self.text_chars = mode, text_chars

    @property
    def audio_s(self) -> float:
        return self.audio_samples / self.sample_rate if self.sample_rate else 0.0

    def first_audio(self) -> None:
        """Note the time of the request's first audio (the first call counts)."""
        if self.ttfb_s is None:
            self.ttfb_s = time.perf_counter() - self.started

    def finish(self, status: int, result: str) -> None:
        if self._done:
            return
        self._done = True
        wall_s = time.perf_counter() - self.started
        ttfb = f"{1000 * self.ttfb_s:.0f}" if self.ttfb_s is not None else "-"
        rtf = f"{wall_s / self.audio_s:.3f}" if self.audio_s > 0 else "-"
        log.info("request id=%s status=%d mode=%s text_chars=%d ttfb_ms=%s audio_s=%.2f wall_s=%.2f rtf=%s result=%s",
                 self.id, status, self.mode, self.text_chars, ttfb, self.audio_s, wall_s, rtf, result)
        if self.metrics is not None:
            self.metrics.observe_request(self, wall_s, result)
