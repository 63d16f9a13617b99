"""A PyAudio stand-in for the seed's streaming example: the "played" bytes are appended to $FISH_PYAUDIO_OUT,
one line per `write` call recorded in $FISH_PYAUDIO_OUT.writes (the chunk sizes)."""

from __future__ import annotations

import os

paInt16 = 8


class _Stream:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self._out = os.environ["FISH_PYAUDIO_OUT"]

    def write(self, data: bytes) -> None:
        with open(self._out, "ab") as f:
            f.write(data)
        with open(self._out + ".writes", "a") as f:
            f.write(f"{len(data)}\n")

    def stop_stream(self) -> None:
        pass

    def close(self) -> None:
        pass


class PyAudio:
    def open(self, **kwargs) -> _Stream:
        return _Stream(**kwargs)

    def terminate(self) -> None:
        pass
