"""Helpers of the voice agent's service tests: the service on a tiny TTS model with a chat model of the test's
choosing, the data lines of a streamed /run, and the checks of the audio it answers."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import soundfile

from service_live import service_env

AXIOS_STAND_IN = """\
// A stand-in for the subset of axios the seed's JavaScript example uses (post, JSON or a stream), on Node's http.
const http = require('http');
function post(url, data, config = {}) {
  return new Promise((resolve, reject) => {
    const body = Buffer.from(JSON.stringify(data));
    const headers = Object.assign({}, config.headers, {'Content-Length': body.length});
    const request = http.request(url, {method: 'POST', headers}, (response) => {
      if (config.responseType === 'stream') { resolve({status: response.statusCode, data: response}); return; }
      const parts = [];
      response.on('data', (part) => parts.push(part));
      response.on('end', () => {
        const text = Buffer.concat(parts).toString();
        let parsed = text;
        try { parsed = JSON.parse(text); } catch (e) {}
        if (response.statusCode >= 400) {
          const error = new Error(`Request failed with status code ${response.statusCode}`);
          error.response = {status: response.statusCode, data: parsed};
          reject(error);
        } else {
          resolve({status: response.statusCode, data: parsed});
        }
      });
    });
    request.on('error', reject);
    request.end(body);
  });
}
module.exports = {post};
"""


def agent_env(workdir: Path, backend: str, model_dir: Path, chat_url: str | None = None, **settings: str
              ) -> dict[str, str]:
    """The service on the tiny `backend` model; the embedded chat model unless `chat_url` names an
    OpenAI-compatible one. Answers are cut at 40 tokens ([agent] max_new_tokens_limit), whatever a request asks
    for: the seed's examples ask for 512, minutes of CPU time on a busy test machine."""
    env = {**service_env(workdir, backend, model_dir), "COSYAPP_MODEL_WARMUP": "false",
           "COSYAPP_AGENT_EMBEDDED_DEVICE": "cpu",
           "COSYAPP_AGENT_MAX_NEW_TOKENS_LIMIT": "40", **settings}
    if chat_url is not None:
        env.update(COSYAPP_AGENT_CHAT="openai", COSYAPP_AGENT_CHAT_URL=chat_url, COSYAPP_AGENT_CHAT_MODEL="scripted")
    return env


def data_events(lines: list[str]) -> list[dict]:
    """The events of a streamed answer's `data:` lines (blank separators skipped)."""
    events = []
    for line in lines:
        if line:
            assert line.startswith("data: "), line
            events.append(json.loads(line[len("data: "):]))
    return events


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    samples, sample_rate = soundfile.read(io.BytesIO(data), dtype="int16")
    return samples, sample_rate


def streamed_audio(events: list[dict], sample_rate: int) -> np.ndarray:
    """The audio of a stream's audio events: each one a whole WAV file at the answer's rate, in order."""
    pieces = []
    for event in events:
        if event["type"] == "audio":
            samples, rate = decode_wav(base64.b64decode(event["content"]))
            assert rate == sample_rate and samples.size > 0
            pieces.append(samples)
    assert pieces, "no audio in the stream"
    return np.concatenate(pieces)
