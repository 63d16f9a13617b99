"""Engine: request types, the backend interface, and the scheduler that runs backends off the event loop."""

from cosyapp.engine.types import (
    Backend,
    BackendInfo,
    Cancelled,
    InputError,
    Mode,
    ModelFileError,
    SynthesisRequest,
    Voice,
)

__all__ = [
    "Backend",
    "BackendInfo",
    "Cancelled",
    "InputError",
    "Mode",
    "ModelFileError",
    "SynthesisRequest",
    "Voice",
]
