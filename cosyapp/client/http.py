"""A small client of a running service's POST /synthesize (used by `cosyapp synth` and `cosyapp play`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx


class ServiceError(RuntimeError):
    """The service refused the request or could not be reached; the message says why."""


@dataclass
class AudioStream:
    sample_rate: int
    channels: int
    request_id: str
    chunks: Iterator[bytes]  # raw s16le PCM as it arrives; chunk sizes are arbitrary (may split a sample)


@contextlib.contextmanager
def synthesize_stream(url: str, text: str, *, instruction: str | None = None, prompt_text: str | None = None,
                      prompt_wav: str | Path | None = None, speaker: str | None = None,
                      api_key: str | None = None, timeout_s: float = 600.0) -> Iterator[AudioStream]:
    """POST /synthesize and yield the PCM stream while it is being produced. `api_key`: the bearer key of
    a service that requires one."""
    fields = {"text": text, "instruction": instruction, "prompt_text": prompt_text, "speaker": speaker}
    data = {name: value for name, value in fields.items() if value}
    endpoint = url.rstrip("/") + "/synthesize"
    with contextlib.ExitStack() as stack:
        files = None
        if prompt_wav is not None:
            files = {"prompt_wav": (Path(prompt_wav).name, stack.enter_context(open(prompt_wav, "rb")))}
        client = stack.enter_context(httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0)))
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
            response = stack.enter_context(client.stream("POST", endpoint, data=data, files=files, headers=headers))
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach the service at {url}: {e}") from None
        if response.status_code != 200:
            response.read()
            try:
                detail = response.json()["detail"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:500]
            raise ServiceError(f"the service answered {response.status_code}: {detail}")
        sample_format = response.headers.get("x-sample-format", "s16le")
        if sample_format != "s16le":
            raise ServiceError(f"unexpected sample format {sample_format!r} (this client plays s16le)")
        yield AudioStream(
            sample_rate=int(response.headers["x-sample-rate"]),
            channels=int(response.headers.get("x-channels", "1")),
            request_id=response.headers.get("x-request-id", ""),
            chunks=response.iter_raw(),
        )
