"""Play a PCM s16le stream through PyAudio while it arrives (the kiosk side of /synthesize).

Network chunks do not respect sample boundaries, so `StreamingPlayer` keeps a partial frame from one chunk
and completes it with the next. The output stream is injectable: anything with `write(bytes)` and `close()`
works, which is how tests run without a sound card. PyAudio (and the PortAudio library under it) is an
optional extra: `pip install 'cosyapp[client]'` after `apt-get install portaudio19-dev`.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

SAMPLE_WIDTH = 2  # s16le


class PlayerUnavailable(RuntimeError):
    """PyAudio, PortAudio or an output device is missing; the message says how to fix it."""


class OutputStream(Protocol):
    def write(self, frames: bytes) -> Any: ...

    def close(self) -> None: ...


class PyAudioOutput:
    """A blocking PyAudio output stream for s16le audio."""

    def __init__(self, sample_rate: int, channels: int = 1, device_index: int | None = None) -> None:
        try:
            import pyaudio
        except ImportError as e:
            raise PlayerUnavailable(
                "pyaudio is not installed: run `pip install 'cosyapp[client]'` (it needs PortAudio: "
                f"`apt-get install portaudio19-dev` on Debian/Ubuntu) ({e})") from None
        self._pyaudio = pyaudio.PyAudio()
        try:
            self._stream = self._pyaudio.open(format=pyaudio.paInt16, channels=channels, rate=sample_rate,
                                              output=True, output_device_index=device_index)
        except (OSError, ValueError) as e:
            self._pyaudio.terminate()
            where = f"device {device_index}" if device_index is not None else "the default output device"
            raise PlayerUnavailable(f"cannot open {where} for {sample_rate} Hz s16le audio: {e}. "
                                    "Check the sound card (`aplay -l`) or pass --device") from None

    def write(self, frames: bytes) -> None:
        self._stream.write(frames)

    def close(self) -> None:
        try:
            self._stream.stop_stream()
            self._stream.close()
        finally:
            self._pyaudio.terminate()


class StreamingPlayer:
    """Feeds arbitrary byte chunks to an output stream in whole frames."""

    def __init__(self, output: OutputStream, channels: int = 1) -> None:
        self.output = output
        self.frame_bytes = SAMPLE_WIDTH * channels
        self._partial = b""
        self.frames_played = 0

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        whole = len(data) - len(data) % self.frame_bytes
        self._partial = data[whole:]
        if whole:
            self.output.write(data[:whole])
            self.frames_played += whole // self.frame_bytes

    def close(self) -> None:
        """Drop a trailing partial frame (a truncated stream) and close the output."""
        self._partial = b""
        self.output.close()


def play_stream(chunks: Iterable[bytes], sample_rate: int, channels: int = 1, output: OutputStream | None = None,
                device_index: int | None = None) -> float:
    """Play PCM s16le chunks as they come; returns the seconds of audio played."""
    player = StreamingPlayer(output or PyAudioOutput(sample_rate, channels, device_index), channels)
    try:
        for chunk in chunks:
            player.feed(chunk)
    finally:
        player.close()
    return player.frames_played / sample_rate
