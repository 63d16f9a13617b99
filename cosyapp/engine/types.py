"""The request, voice and backend types every API surface and every backend share.

Transport adapters turn their wire format into a `SynthesisRequest`; a backend turns a request into
float32 mono chunks at its native sample rate. Nothing in here knows about HTTP or about a model.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

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
    """What a backend is and what it can do: the server asks nothing of a backend that it did not declare here."""

    model_type: str
    model_dir: str
    sample_rate: int
    modes: tuple[str, ...]
    # Instructions (the instruct2 mode: a style instruction with the prompt voice).
    instruct: bool = False
    # Voices of several reference recordings (`combine_voices`) or of none (`no_reference_voice`: the model's own).
    reference_voices: bool = False
    # Codec codes of audio and back (`encode_codes` / `decode_codes`): grids of this many codebooks; 0: no codec.
    codec_codebooks: int = 0
    # Names of the request options `parse_options` takes.
    options: tuple[str, ...] = ()
    # What the LM's transformer weights are (CosyVoice: "int8" or the compute dtype, e.g. "float32"); "": not said.
    lm_weights: str = ""


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
    # The backend's typed request options (`Backend.parse_options`); a mapping of option names (or None) is parsed
    # by the backend when the request runs, for callers that build requests themselves.
    options: Any = None
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

    def parse_options(self, values: Mapping[str, Any] | None) -> Any:
        """Request options by name -> the backend's typed options, each checked against its one range. Raises
        InputError naming the option (unknown names included)."""
        ...

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """Yield float32 mono chunks at `info().sample_rate`; one chunk when `request.stream` is False.
        Checks `request.cancel` between chunks and LM steps and stops with `Cancelled`."""
        ...


class ReferenceVoices(Protocol):
    """What a backend with `BackendInfo.reference_voices` implements as well."""

    def combine_voices(self, voices: Sequence[Voice], texts: Sequence[str]) -> Voice:
        """One voice of several prepared reference recordings, each with its transcript ("" when unknown)."""
        ...

    def no_reference_voice(self) -> Voice:
        """A voice without references: the model speaks in a voice of its own choosing."""
        ...


class Codec(Protocol):
    """What a backend with `BackendInfo.codec_codebooks` implements as well. Blocking; the engine runs it."""

    def encode_codes(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float32 recording -> integer codes `[codec_codebooks, frames]`. InputError for unusable audio."""
        ...

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Integer codes `[codec_codebooks, frames]` -> mono float32 audio at `info().sample_rate`."""
        ...
