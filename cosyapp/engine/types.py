"""The request, voice and backend types every API surface and every backend share.

Transport adapters turn their wire format into a `SynthesisRequest`; a backend turns a request into
float32 mono chunks at its native sample rate. Nothing in here knows about HTTP or about a model.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

from cosyapp.engine.stats import StageTimes


class InputError(ValueError):
    """Bad input from a user (text, audio, parameters). The message is safe to show to the client."""


class ModelFileError(RuntimeError):
    """A model directory is missing a file or holds a corrupt one. The message names the file."""


class Cancelled(Exception):
    """Raised inside a backend when the request's cancel event is set (the client went away)."""


class Mode(str, enum.Enum):
    ZERO_SHOT = "zero_shot"  # prompt text + prompt voice
    CROSS_LINGUAL = "cross_lingual"  # prompt voice only
    INSTRUCT2 = "instruct2"  # instruction + prompt voice


@dataclass(frozen=True)
class BackendInfo:
    model_type: str
    model_dir: str
    sample_rate: int
    modes: tuple[str, ...]


@dataclass
class Voice:
    """Prompt features computed once from a recording and reused by every request that names it.

    `features` is backend specific (CosyVoice2: speech tokens, CAM++ embedding, 24 kHz mel). `text` is the
    transcript of the recording when known (zero-shot needs it).
    """

    backend: str
    features: Any
    text: str | None = None
    duration_s: float = 0.0


@dataclass
class SynthesisRequest:
    text: str
    voice: Voice
    mode: Mode = Mode.CROSS_LINGUAL
    instruction: str | None = None
    prompt_text: str | None = None
    stream: bool = True
    seed: int | None = None
    # Benchmarks on random weights: ignore the stop token and generate exactly this many LM tokens per sentence.
    fixed_length: int | None = None
    # Backend-specific sampling options (Fish: temperature, top_p, repetition_penalty, ...).
    options: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    # Benchmarks set this to collect per-stage wall times; None on the serving path.
    stats: StageTimes | None = None

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()


class Backend(Protocol):
    """What a backend implements. All methods are blocking and thread-safe; the engine runs them off the
    event loop."""

    name: str

    def info(self) -> BackendInfo: ...

    def prepare_voice(self, audio: np.ndarray, sample_rate: int, text: str | None = None) -> Voice:
        """Compute prompt features from a mono float32 recording. Raises InputError for unusable audio."""
        ...

    def voice_state(self, voice: Voice) -> dict[str, Any]:
        """The voice's features as a dict of tensors/plain values that `torch.save` can store on disk."""
        ...

    def voice_from_state(self, state: dict[str, Any], text: str | None) -> Voice:
        """Rebuild a voice from `voice_state` output (the speaker registry keeps features precomputed)."""
        ...

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at `info().sample_rate`; one chunk when `request.stream` is False.
        Checks `request.cancel` between chunks and LM steps and stops with `Cancelled`."""
        ...
