"""The fuzz corpus: requests to every route of the service and sessions of the live socket, generated with
hypothesis from the routes' own field lists.

A case mixes plausible values (short texts, the formats and ids the API knows, a real recording, small token
budgets, so that many requests get past validation and into the engine) with hostile ones: wrong types, huge
and lone-surrogate strings, integers of hundreds of digits, path traversal in ids, deeply nested documents,
unknown fields, truncated or garbage bodies and wrong content types. Generation is seeded: the same seed gives the
same corpus."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import ormsgpack
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from cosyapp.robustness.service import PROMPT, PROMPT_B64
from cosyapp.server.fish_wire import TTS_FIELDS
from cosyapp.server.routes import agent, fish_async, fish_live, flash_api, openai_api, synthesize

DEEP = "__deeply_nested__"  # a value replaced by a nesting deeper than any parser's recursion limit
HUGE_TEXT = "x" * 1_000_000
TRICKY = ["", " ", "..", "../../../etc/passwd", "..\\..\\windows", "/etc/passwd", "%2e%2e%2f", "a/b", "\x00",
          "\ud800", "text \udfff", "名字", "<script>", "1e999", "NaN", "-1", "9" * 400, "true", "null", "default",
          "alloy", "fish", "cosyvoice2", "mp3", "wav", "pcm", "on", "moderate", DEEP, HUGE_TEXT]
IDS = ["fuzz_voice", "fuzz-2", "alice", "nobody", "../../etc", "a" * 65, "", " ", "x/y", "\ud800", "default"]
TEXTS = ["hello.", "你好。", "Good morning, how are you today?", "1234567", "。。。", "!", "hi " * 50,
         "a" * 2001, "\ud800", "text\x00with nul"]


@dataclass(frozen=True)
class Case:
    """One HTTP request (`frames` empty) or one live-socket session (`frames`: what the client sends)."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    files: dict[str, tuple[str, bytes, str]] | None = None  # multipart uploads beside a form in `form`
    form: dict[str, str] | None = None
    frames: tuple[bytes | str, ...] = ()
    route: str = ""  # the route's template, where `path` fills in a parameter

    @property
    def label(self) -> str:
        return self.route or self.path

    def describe(self) -> str:
        what = f"{len(self.frames)} frames" if self.frames else f"{len(self.body)} bytes"
        return f"{self.method} {self.path} ({what}): {(self.body or repr(self.form or self.frames).encode())[:120]!r}"


# ---- values --------------------------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 5000), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30), st.sampled_from(TRICKY),
    st.integers(min_value=2**64, max_value=10**400))
ANY_VALUE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def _grid(codebooks: int) -> st.SearchStrategy:
    width = st.integers(1, 24)
    return width.flatmap(lambda w: st.lists(st.lists(st.integers(0, 1100), min_size=w, max_size=w),
                                            min_size=codebooks, max_size=codebooks))


def plausible(codebooks: int) -> dict[str, st.SearchStrategy]:
    """Values that pass (or nearly pass) each field's checks, by field name."""
    texts = st.sampled_from(TEXTS)
    audio = st.sampled_from([PROMPT_B64, PROMPT_B64[:400], "bm90IGF1ZGlv", "not base64!"])
    return {
        "text": texts, "input": texts, "prompt_text": texts, "reference_text": texts,
        "instruction": st.sampled_from(["Speak slowly.<|endofprompt|>", "happy", "x" * 2001]),
        "instructions": st.sampled_from(["Speak slowly.", "x" * 2001]),
        "format": st.sampled_from(["wav", "pcm", "mp3", "opus", "flac", "ogg"]),
        "response_format": st.sampled_from(["wav", "pcm", "mp3", "opus", "flac", "aac"]),
        "fixed_length": st.integers(1, 30), "max_new_tokens": st.integers(1, 24), "max_tokens": st.integers(1, 30),
        "chunk_length": st.integers(90, 310), "min_chunk_length": st.integers(0, 300),
        "top_p": st.floats(0, 1.2), "temperature": st.floats(0, 1.2), "repetition_penalty": st.floats(0.8, 2.1),
        "speed": st.one_of(st.floats(0.1, 5), st.sampled_from(["moderate", "high"])),
        "seed": st.integers(-1, 2**31), "streaming": st.booleans(), "stream": st.booleans(),
        "normalize": st.booleans(), "use_memory_cache": st.sampled_from(["on", "off"]),
        "latency": st.sampled_from(["normal", "balanced"]),
        "reference_id": st.sampled_from(IDS), "speaker": st.sampled_from(IDS), "name": st.sampled_from(IDS),
        "id": st.sampled_from(IDS), "step_id": st.sampled_from(IDS), "voice": st.sampled_from(IDS + ["alloy"]),
        "old_reference_id": st.sampled_from(IDS), "new_reference_id": st.sampled_from(IDS),
        "model": st.sampled_from(["tts-1", "cosyvoice2", ""]), "backend": st.sampled_from(["fish", "cosyvoice2", "x"]),
        "stream_format": st.sampled_from(["audio", "sse"]),
        "audio": audio, "reference_audio": audio, "audios": st.lists(audio, max_size=5),
        "references": st.lists(st.fixed_dictionaries({"audio": audio, "text": texts}), max_size=2),
        "tokens": st.lists(_grid(codebooks), min_size=1, max_size=2),
        "sample_rate": st.sampled_from([44100, 24000, 0]), "mp3_bitrate": st.sampled_from([64, 128, 100]),
        "message": texts, "system_message": texts, "system_audio": audio,
        "conversation_id": st.sampled_from(IDS + ["fuzz-talk"]), "max_text_length": st.integers(0, 3000),
    }


def _fields(names: tuple[str, ...], codebooks: int) -> st.SearchStrategy[dict[str, Any]]:
    """Some of `names` (plausible or hostile values), sometimes an unknown field too."""
    values = plausible(codebooks)

    def one(name: str) -> st.SearchStrategy:
        good = values.get(name, SCALARS)
        return st.one_of(good, good, good, ANY_VALUE)

    chosen = st.lists(st.sampled_from(names), max_size=len(names), unique=True) if names else st.just([])
    extra = st.dictionaries(st.sampled_from(["unknown", "Text", HUGE_TEXT, "\ud800", "__proto__"]), SCALARS,
                            max_size=1)
    return st.tuples(chosen.flatmap(lambda ns: st.fixed_dictionaries({n: one(n) for n in ns})), extra,
                     st.integers(0, 9)).map(lambda t: {**t[0], **t[1]} if t[2] == 0 else t[0])


# ---- bodies --------------------------------------------------------------------------------------------------


def _json(document: Any) -> bytes:
    text = json.dumps(document)
    return text.replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000).encode()


def _msgpack(document: Any) -> bytes:
    try:
        return ormsgpack.packb(document)
    except (TypeError, ormsgpack.MsgpackEncodeError):
        return b"\xc1" + _json(document)  # not packable (a huge integer, a lone surrogate): garbage then


def _mutated(body: bytes, mutation: int, rng: random.Random) -> bytes:
    """The body as is, or truncated, or with random bytes (mutation: 0-9; 7-9 change it)."""
    if mutation == 7:
        return body[:rng.randrange(len(body) + 1)]
    if mutation == 8:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if mutation == 9 and body:
        at = rng.randrange(len(body))
        return body[:at] + bytes([rng.randrange(256)]) + body[at + 1:]
    return body


def _document_case(method: str, path: str, document: dict[str, Any], kind: str, mutation: int,
                   rng: random.Random) -> Case:
    body = _msgpack(document) if kind == "msgpack" else _json(document)
    content_type = {"json": "application/json", "msgpack": "application/msgpack"}[kind]
    if mutation == 6:
        content_type = rng.choice(["text/plain", "", "multipart/form-data", "application/json; charset=latin-1"])
    return Case(method, path, {"Content-Type": content_type} if content_type else {}, _mutated(body, mutation, rng))


def _form_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if not isinstance(value, int) else str(value)


def _form_case(path: str, document: dict[str, Any], file_fields: tuple[str, ...], mutation: int) -> Case:
    form = {str(name): _form_value(value)[:200_000] for name, value in document.items() if name not in file_fields}
    files = {name: ("voice.wav", PROMPT if mutation % 2 == 0 else b"RIFF not really", "audio/wav")
             for name in file_fields if name in document}
    return Case("POST", path, form={k.encode("utf-8", "replace").decode(): v.encode("utf-8", "replace").decode()
                                    for k, v in form.items()}, files=files or None)


# ---- routes --------------------------------------------------------------------------------------------------

# The voice agent's RunPod routes take any endpoint id.
AGENT_ENDPOINT = "/v2/fuzz-endpoint"
GET_PATHS = ("/", "/health", "/model_info", "/stats", "/metrics", "/v1/health", "/v1/references/list", "/audio_roles",
             "/server_info", "/v1/audio/voices", "/v1/models", f"{AGENT_ENDPOINT}/health")
TASK_PATHS = ("/get_task_status/{id}", "/download_result/{id}", "/stop_async_task/{id}")
DOCUMENT_ROUTES = (  # (method, path, fields)
    ("POST", "/v1/tts", TTS_FIELDS),
    ("POST", "/generate_audio_enhanced_async", fish_async.ASYNC_FIELDS),
    ("POST", "/v1/vqgan/encode", ("audios",)),
    ("POST", "/v1/vqgan/decode", ("tokens",)),
    ("POST", "/v1/references/add", ("id", "audio", "text")),
    ("DELETE", "/v1/references/delete", ("reference_id",)),
    ("POST", "/v1/references/update", ("old_reference_id", "new_reference_id")),
    ("POST", "/stop_generation", ("step_id",)),
    ("POST", "/speak", flash_api.SPEAK_FIELDS),
    ("POST", "/v1/audio/speech", openai_api.FIELDS),
)
FORM_ROUTES = (  # (path, fields, file fields)
    ("/synthesize", synthesize.FIELDS, ("prompt_wav",)),
    ("/clone_voice", flash_api.CLONE_FIELDS, ("reference_audio_file",)),
    ("/add_speaker", flash_api.ADD_FIELDS, ("audio_file",)),
    ("/delete_speaker", ("name",), ()),
    ("/v1/references/add", ("id", "audio", "text"), ("audio",)),
)
# The voice agent: a run's fields sit under "input"; its job routes answer at the root and under RunPod's prefix.
AGENT_RUN_PATHS = ("/run", "/runsync", f"{AGENT_ENDPOINT}/run", f"{AGENT_ENDPOINT}/runsync")
AGENT_JOB_PATHS = tuple(f"{prefix}/{action}/{{id}}" for prefix in ("", AGENT_ENDPOINT)
                        for action in ("status", "stream", "cancel"))
LIVE_PATH = "/v1/tts/live"
ROUTES = tuple(dict.fromkeys((*GET_PATHS, *TASK_PATHS, *(path for _, path, _ in DOCUMENT_ROUTES),
                              *(path for path, _, _ in FORM_ROUTES), *AGENT_RUN_PATHS, *AGENT_JOB_PATHS,
                              LIVE_PATH)))  # /v1/references/add: both kinds


def _live_case(start: dict[str, Any], events: list[dict[str, Any]], mutation: int, rng: random.Random) -> Case:
    frames: list[bytes | str] = [_msgpack({"event": "start", "request": start})]
    frames += [_msgpack(event) for event in events]
    if mutation == 7:
        frames.insert(rng.randrange(len(frames) + 1), "a text frame")
    elif mutation == 8:
        frames.insert(rng.randrange(len(frames) + 1), b"\xc1garbage")
    elif mutation == 9:
        frames.append(b"\x91" * 100_000 + b"\xc0")  # nested far too deeply
    return Case("WS", LIVE_PATH, frames=tuple(frames))


def _route_strategies(codebooks: int) -> list[tuple[str, int, st.SearchStrategy[Case]]]:
    """(route, weight, cases of that route) for every route: routes that take a body get more of the corpus than
    those that take only a path, and the live socket (many events per case) the most."""
    seeds = st.randoms(use_true_random=False)
    mutations = st.integers(0, 9)
    ids = st.sampled_from(IDS + ["../../x", "%2e%2e", "a" * 300])
    text_events = st.one_of(
        st.builds(lambda text: {"event": "text", "text": text}, st.one_of(st.sampled_from(TEXTS), ANY_VALUE)),
        st.just({"event": "flush"}), st.builds(lambda kind: {"event": kind}, st.sampled_from(TRICKY)))

    def with_id(path: str, methods: list[str]) -> st.SearchStrategy[Case]:
        return st.tuples(ids, st.sampled_from(methods)).map(
            lambda t: Case(t[1], path.replace("{id}", t[0] or "x"), route=path))

    def document(method: str, path: str, names: tuple[str, ...]) -> st.SearchStrategy[Case]:
        return st.builds(lambda fields, kind, mutation, rng: _document_case(method, path, fields, kind, mutation, rng),
                         _fields(names, codebooks), st.sampled_from(["json", "json", "msgpack"]), mutations, seeds)

    def form(path: str, names: tuple[str, ...], file_fields: tuple[str, ...]) -> st.SearchStrategy[Case]:
        return st.builds(lambda fields, mutation: _form_case(path, fields, file_fields, mutation),
                         _fields(names, codebooks), mutations)

    def agent_run(path: str) -> st.SearchStrategy[Case]:
        return st.builds(lambda inputs, outer, mutation, rng: _document_case("POST", path, {"input": inputs, **outer},
                                                                              "json", mutation, rng),
                         _fields(agent.INPUT_FIELDS, codebooks), _fields(agent.REQUEST_FIELDS[1:], codebooks),
                         mutations, seeds)

    live = st.builds(lambda start, events, mutation, rng: _live_case(start, events + [{"event": "stop"}],
                                                                     mutation, rng),
                     _fields(fish_live.LIVE_FIELDS, codebooks), st.lists(text_events, max_size=5), mutations, seeds)
    return [
        *((path, 1, st.just(Case("GET", path))) for path in GET_PATHS),
        *((path, 1, with_id(path, ["POST" if path.startswith("/stop") else "GET"])) for path in TASK_PATHS),
        *((path, 1, with_id(path, ["POST"] if "/cancel/" in path else ["GET", "POST"])) for path in AGENT_JOB_PATHS),
        *((f"{method} {path}", 4, document(method, path, names)) for method, path, names in DOCUMENT_ROUTES),
        *((f"form {path}", 4, form(path, names, files)) for path, names, files in FORM_ROUTES),
        *((path, 4, agent_run(path)) for path in AGENT_RUN_PATHS),
        (LIVE_PATH, 16, live),
    ]


def _shares(count: int, weights: list[int]) -> list[int]:
    """`count` split by `weights` (largest remainders), every part at least one case when there are enough."""
    floor = 1 if count >= len(weights) else 0
    rest = count - floor * len(weights)
    exact = [rest * weight / sum(weights) for weight in weights]
    shares = [floor + int(part) for part in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: int(exact[i]) - exact[i])
    for i in by_remainder[:count - sum(shares)]:
        shares[i] += 1
    return shares


def _generate(strategy: st.SearchStrategy[Case], count: int, corpus_seed: int) -> list[Case]:
    cases: list[Case] = []
    for round_seed in range(corpus_seed, corpus_seed + 100):  # hypothesis may stop early: go on with a new seed

        @seed(round_seed)
        @settings(max_examples=count - len(cases), database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def collect(case: Case) -> None:
            cases.append(case)

        collect()
        if len(cases) >= count:
            break
    return cases[:count]


def generate_corpus(count: int, corpus_seed: int, codebooks: int) -> list[Case]:
    """`count` cases over every route (each gets its share; mixed in a seeded order), the same ones for the same
    seed. `codebooks`: the Fish codec's (for plausible code grids)."""
    routes = _route_strategies(codebooks)
    cases = [case for i, ((_, _, strategy), share) in enumerate(zip(routes, _shares(count, [w for _, w, _ in routes])))
             if share for case in _generate(strategy, share, corpus_seed * 1000 + i)]
    random.Random(corpus_seed).shuffle(cases)
    return cases
