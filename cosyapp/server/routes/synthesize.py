"""POST /synthesize: the seed's streaming endpoint.

Form fields (multipart/form-data, or application/x-www-form-urlencoded when no file is sent):
    text (required), instruction, prompt_text, prompt_wav (file), speaker (a registered id), format (pcm|wav),
    fixed_length (benchmarking aid: generate exactly N LM tokens per sentence, ignoring the stop token, so
    load tests on random weights produce comparable amounts of audio),
    backend (one of the loaded backends, e.g. fish; default: [model] backend),
    sample_rate (the rate to send, e.g. 16000; resampled on the server while streaming; default: the backend's),
    seed (an integer: the same request with the same seed gives the same audio)
The voice is the speaker's, else prompt_wav, else the default prompt voice; prompt_text is the transcript of
the voice's recording. Mode: the speech service's rules (speech.py).

Everything that can be checked is checked before the first byte, including the first chunk of audio: the
answer is then either a 4xx/5xx JSON `{"detail": ...}` or a 200 whose body is raw PCM s16le mono at the
backend's rate (or the requested `sample_rate`, named in X-Sample-Rate), streamed as the backend produces it. One
log line per request.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cosyapp.config import LimitsSettings
from cosyapp.server.audio_responses import audio_response, speech_response
from cosyapp.server.bodies import audio_bytes, read_form
from cosyapp.server.errors import ApiError, quote
from cosyapp.server.fields import Fields, sample_rate, seed
from cosyapp.server.request_log import RequestRecord
from cosyapp.server.speech import Recording, SpeechRequest, SpeechService, VoiceReference

FIELDS = ("text", "instruction", "prompt_text", "prompt_wav", "speaker", "format", "fixed_length", "backend",
          "sample_rate", "seed")
FORMATS = ("pcm", "wav")
# Room for the text fields and multipart framing on top of the largest allowed upload.
FIELDS_ALLOWANCE = 256 * 1024
# Largest fixed_length: the LM's default context per stream (the backend refuses what does not fit its room).
MAX_FIXED_LENGTH = 4096


async def _prompt_wav(fields: Fields, limits: LimitsSettings) -> bytes | None:
    upload = fields.get("prompt_wav", None)
    if isinstance(upload, str):
        raise ApiError(400, "prompt_wav must be a file upload (curl: -F prompt_wav=@voice.wav)")
    if upload is None:
        return None
    return audio_bytes(await upload.read(), "prompt_wav", limits.max_upload_bytes)


def _fixed_length(fields: Fields, limits: LimitsSettings) -> int | None:
    value = fields.text("fixed_length", limit=limits.max_text_chars)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 6 and 1 <= int(value) <= MAX_FIXED_LENGTH):
        raise ApiError(400, f"fixed_length must be a whole number of LM tokens from 1 to {MAX_FIXED_LENGTH}; "
                            f"got {value[:40]!r}")
    return int(value)


async def read_request(request: Request, limits: LimitsSettings) -> tuple[SpeechRequest, str]:
    """(the speech request, the answer's format) from the form."""
    async with read_form(request, FIELDS, limits.max_upload_bytes + FIELDS_ALLOWANCE, max_files=1) as fields:
        fields.get("text")  # 400 "missing required field 'text'"
        text = fields.text("text", limit=limits.max_text_chars)
        if text is None:
            raise ApiError(400, "text is empty")
        prompt_wav = await _prompt_wav(fields, limits)
    speaker = fields.text("speaker", limit=limits.max_text_chars)
    if speaker is not None and prompt_wav is not None:
        raise ApiError(400, "give either 'speaker' or 'prompt_wav', not both")
    audio_format = (fields.text("format") or "pcm").lower()
    if audio_format not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}; got {quote(audio_format)}")
    recordings = (Recording(prompt_wav, "prompt_wav"),) if prompt_wav is not None else ()
    voice = VoiceReference(speaker=speaker, recordings=recordings,
                           transcript=fields.text("prompt_text", limit=limits.max_text_chars))
    return SpeechRequest(text=text, voice=voice, instruction=fields.text("instruction", limit=limits.max_text_chars),
                         fixed_length=_fixed_length(fields, limits),
                         backend=fields.text("backend", limit=limits.max_text_chars),
                         sample_rate=sample_rate(fields), seed=seed(fields)), audio_format


async def synthesize(request: Request) -> Response:
    speech: SpeechService = request.app.state.speech

    async def answer(record: RequestRecord, headers: dict[str, str]) -> Response:
        speech.state.ready_engine()  # 503 while loading, before reading the upload
        body, audio_format = await read_request(request, speech.state.settings.limits)
        started = await speech.start(body, record)
        return await audio_response(request, started, record, audio_format, headers, stream=True)

    return await speech_response(speech, answer)


routes = [Route("/synthesize", synthesize, methods=["POST"])]
