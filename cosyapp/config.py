"""Service configuration: `config.toml` -> frozen dataclasses, with COSYAPP_* environment overrides.

Precedence, lowest first: the defaults below, the config file, environment variables
`COSYAPP_<SECTION>_<KEY>` (e.g. `COSYAPP_SERVER_PORT=8080`, `COSYAPP_ENGINE_MAX_CONCURRENT=4`), then CLI flags
(`cosyapp serve --port ...`, applied by the caller with `dataclasses.replace`).

Relative paths are resolved against the directory of the file that set them: the config file's folder for
file values, the current directory for environment values, the project root for built-in defaults. Every
problem raises `ConfigError` with a message that names the key, so a bad config stops startup clearly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "config.toml"
ENV_PREFIX = "COSYAPP_"
# Variables with the prefix that are not config keys (the config file itself, the client's service URL).
ENV_NOT_KEYS = {"COSYAPP_CONFIG", "COSYAPP_URL"}

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")  # spellings of booleans in variables

AUTO = "auto"  # the value of a setting the service sizes itself at start-up

# Choices of the CosyVoice sections' `lm_weights` (backends/cosyvoice2/lm_weights.py resolves them). Kept here, where
# loading the config needs no torch.
LM_WEIGHTS = ("auto", "float", "int8")

DEFAULT_INSTRUCTION = "你是一位热情友好的餐馆店员,说话温柔亲切,语气礼貌专业。<|endofprompt|>"


class ConfigError(ValueError):
    """A config file or environment variable is invalid. The message names the key."""


def _rule(**kwargs: Any) -> dict[str, Any]:
    """Validation rules stored in a field's metadata: min, max (numbers), choices and pattern (strings), auto (the
    string "auto" is also accepted)."""
    return kwargs


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = field(default=50000, metadata=_rule(min=1, max=65535))
    log_level: str = field(default="info", metadata=_rule(choices=("debug", "info", "warning", "error")))
    # Bearer token required on every route but /health and /v1/health ("" = no authentication).
    api_key: str = ""
    # Run on tcmalloc when it is installed (`cosyapp serve` restarts itself once with it preloaded; allocator.py).
    tcmalloc: bool = True
    # Seconds a client may take to send a request's headers (from its first byte, or from connecting), and its
    # whole body; slower clients get 408 (a body) or the connection closed (headers) instead of holding it.
    header_timeout_s: float = field(default=10.0, metadata=_rule(min=0.1, max=3600.0))
    body_timeout_s: float = field(default=60.0, metadata=_rule(min=0.1, max=3600.0))


@dataclass(frozen=True)
class ModelSettings:
    backend: str = "cosyvoice2"  # checked against the backend registry in `_check_backend`
    model_dir: Path = PROJECT_ROOT / "pretrained_models" / "CosyVoice2-0.5B"
    device: str = field(default="auto", metadata=_rule(pattern=r"auto|cpu|cuda(:[0-9]+)?"))
    dtype: str = field(default="auto", metadata=_rule(choices=("auto", "float32", "float16", "bfloat16")))
    warmup: bool = True
    # A second backend loaded beside `backend` ("" = none), from `extra_model_dir`: /synthesize picks it with
    # its `backend` field, and the Fish API (/v1/*) uses whichever loaded backend is "fish".
    extra_backend: str = ""
    extra_model_dir: Path = PROJECT_ROOT / "pretrained_models" / "openaudio-s1-mini"


@dataclass(frozen=True)
class CosyVoice2Settings:
    """Options of the CosyVoice2 backend (passed to `CosyVoice2Backend`)."""

    text_frontend: str = field(default="offline", metadata=_rule(choices=("offline", "wetext")))
    incremental_flow: bool = True
    exact_final: bool = False
    flow_left_chunks: int = field(default=8, metadata=_rule(min=-1, max=10000))
    random_source: bool = True
    tensorrt: bool = True
    cuda_graphs: bool = True
    # The LM transformer's weights: float (the compute dtype), int8 (CPU only), auto (int8 on a CPU for an LM large
    # enough that it pays: backends/cosyvoice2/lm_weights.py).
    lm_weights: str = field(default="auto", metadata=_rule(choices=LM_WEIGHTS))


@dataclass(frozen=True)
class CosyVoice3Settings:
    """Options of the CosyVoice3 backend (passed to `CosyVoice3Backend`)."""

    text_frontend: str = field(default="offline", metadata=_rule(choices=("offline", "wetext")))
    exact_streaming: bool = False
    flow_left_chunks: int = field(default=8, metadata=_rule(min=-1, max=10000))
    lm_weights: str = field(default="auto", metadata=_rule(choices=LM_WEIGHTS))  # as [cosyvoice2] lm_weights


@dataclass(frozen=True)
class FishSettings:
    """Options of the Fish backend (passed to `FishBackend`)."""

    check_every: int = field(default=4, metadata=_rule(min=1, max=256))
    penalty_main_history: bool = False


@dataclass(frozen=True)
class FishApiSettings:
    """The Fish Speech HTTP API (/v1/tts, /v1/references/*, the async tasks)."""

    # Streaming format=wav starts with a WAV header; false = upstream's headerless PCM labelled audio/wav.
    wav_stream_header: bool = True
    # Finished async tasks (and their results) are deleted after this many hours; 0 = kept forever.
    keep_tasks_hours: float = field(default=168.0, metadata=_rule(min=0.0, max=1e6))


@dataclass(frozen=True)
class HubSettings:
    # Hugging Face token for gated repos (fish); the HF_TOKEN variable or `huggingface-cli login` also work.
    hf_token: str = ""


@dataclass(frozen=True)
class EngineSettings:
    # Streams synthesized at once: a number, or "auto" (sized from the hardware at start-up: engine/sizing.py).
    max_concurrent: int | str = field(default="auto", metadata=_rule(min=1, max=256, auto=True))
    max_queue: int = field(default=8, metadata=_rule(min=0, max=10000))
    retry_after_s: int = field(default=2, metadata=_rule(min=1, max=3600))
    voice_cache_size: int = field(default=64, metadata=_rule(min=1, max=100000))


@dataclass(frozen=True)
class LimitsSettings:
    # Every API's text, instruction and transcript, and each text event of the live socket, in characters.
    max_text_chars: int = field(default=2000, metadata=_rule(min=1, max=1_000_000))
    max_upload_mb: float = field(default=10.0, metadata=_rule(min=0.01, max=1024.0))
    min_prompt_s: float = field(default=0.5, metadata=_rule(min=0.0, max=600.0))
    max_prompt_s: float = field(default=30.0, metadata=_rule(min=0.1, max=600.0))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True)
class DefaultsSettings:
    instruction: str = DEFAULT_INSTRUCTION
    prompt_wav: Path = PROJECT_ROOT / "asset" / "zero_shot_prompt.wav"


@dataclass(frozen=True)
class AgentSettings:
    """The voice agent (/run and RunPod's job routes): its chat model, conversation memory and sentence cutting."""

    # embedded: SmolLM2-135M-Instruct run in-process (tiny; for trying the API); openai: `chat_url`'s
    # /chat/completions (vLLM, llama.cpp server, Ollama, OpenAI, ...).
    chat: str = field(default="embedded", metadata=_rule(choices=("embedded", "openai")))
    chat_url: str = ""  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1
    chat_model: str = ""
    chat_api_key: str = ""
    # Longest wait for the chat endpoint to connect or to send its next piece of text.
    chat_timeout_s: float = field(default=30.0, metadata=_rule(min=0.1, max=3600.0))
    embedded_device: str = field(default="auto", metadata=_rule(pattern=r"auto|cpu|cuda(:[0-9]+)?"))
    max_new_tokens: int = field(default=512, metadata=_rule(min=1, max=32768))
    max_new_tokens_limit: int = field(default=4096, metadata=_rule(min=1, max=32768))
    max_text_length: int = field(default=1000, metadata=_rule(min=1, max=1_000_000))
    max_audio_s: float = field(default=90.0, metadata=_rule(min=1.0, max=3600.0))
    min_sentence_chars: int = field(default=10, metadata=_rule(min=0, max=10000))
    max_sentence_chars: int = field(default=200, metadata=_rule(min=10, max=10000))
    max_turns: int = field(default=20, metadata=_rule(min=2, max=10000))
    idle_expiry_hours: float = field(default=24.0, metadata=_rule(min=0.0, max=1e6))
    max_concurrent: int = field(default=2, metadata=_rule(min=1, max=256))
    runsync_wait_s: float = field(default=90.0, metadata=_rule(min=0.0, max=3600.0))
    keep_jobs_minutes: float = field(default=30.0, metadata=_rule(min=0.0, max=1e6))
    max_jobs: int = field(default=64, metadata=_rule(min=1, max=100000))


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path = PROJECT_ROOT / "var"
    # "" = the local disk under data_dir (one box); redis://host:port/db = the shared store of a cluster.
    shared_store: str = field(default="", metadata=_rule(pattern=r"|rediss?://\S+"))

    @property
    def speakers_dir(self) -> Path:
        return self.data_dir / "speakers"

    @property
    def default_prompt_dir(self) -> Path:
        return self.data_dir / "default_prompt"

    @property
    def tasks_dir(self) -> Path:
        return self.data_dir / "tasks"

    @property
    def documents_dir(self) -> Path:
        return self.data_dir / "documents"


@dataclass(frozen=True)
class ClusterSettings:
    """`cosyapp serve --ray`: the service as a Ray Serve deployment (cosyapp/cluster/)."""

    # Ray cluster to join: "auto" = the one `ray start` runs on this machine; "local" = start one here.
    address: str = "auto"
    min_replicas: int = field(default=1, metadata=_rule(min=0, max=10000))
    max_replicas: int = field(default=1, metadata=_rule(min=1, max=10000))
    # GPUs each replica reserves (0 on CPU-only nodes; fractions share a GPU).
    gpus_per_replica: float = field(default=1.0, metadata=_rule(min=0.0, max=64.0))
    cpus_per_replica: float = field(default=1.0, metadata=_rule(min=0.0, max=1024.0))
    # Requests per replica the autoscaler aims at; "auto" = [engine] max_concurrent.
    target_ongoing_requests: int | str = field(default="auto", metadata=_rule(min=1, max=10000, auto=True))


@dataclass(frozen=True)
class WyomingSettings:
    """The Wyoming TTS server for Home Assistant (server/wyoming_tts.py), on its own TCP port. Off by default: the
    Wyoming protocol has no authentication, so whoever reaches the port can synthesize."""

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = field(default=10200, metadata=_rule(min=1, max=65535))


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    model: ModelSettings = ModelSettings()
    cosyvoice2: CosyVoice2Settings = CosyVoice2Settings()
    cosyvoice3: CosyVoice3Settings = CosyVoice3Settings()
    fish: FishSettings = FishSettings()
    fishapi: FishApiSettings = FishApiSettings()
    hub: HubSettings = HubSettings()
    engine: EngineSettings = EngineSettings()
    limits: LimitsSettings = LimitsSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    storage: StorageSettings = StorageSettings()
    wyoming: WyomingSettings = WyomingSettings()
    cluster: ClusterSettings = ClusterSettings()
    agent: AgentSettings = AgentSettings()
    # Where the file values came from (None: built-in defaults only); shown by `cosyapp prompts show` etc.
    source: Path | None = None

    def backend_options(self, backend: str | None = None) -> dict[str, Any]:
        """Keyword options for a backend's loader (its own config section, if it has one); default: the
        configured backend."""
        section = getattr(self, backend or self.model.backend, None)
        return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}

    def served_backends(self) -> dict[str, Path]:
        """Backend name -> model directory of every backend the service loads, `[model] backend` first."""
        backends = {self.model.backend: self.model.model_dir}
        if self.model.extra_backend:
            backends[self.model.extra_backend] = self.model.extra_model_dir
        return backends


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "model": ModelSettings,
    "cosyvoice2": CosyVoice2Settings,
    "cosyvoice3": CosyVoice3Settings,
    "fish": FishSettings,
    "fishapi": FishApiSettings,
    "hub": HubSettings,
    "engine": EngineSettings,
    "limits": LimitsSettings,
    "defaults": DefaultsSettings,
    "storage": StorageSettings,
    "wyoming": WyomingSettings,
    "cluster": ClusterSettings,
    "agent": AgentSettings,
}


def _field(section: str, key: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key)


def _convert(value: Any, type_name: str, where: str, base_dir: Path, from_env: bool) -> Any:
    """Turn a TOML value (or an environment string) into the field's type; raise ConfigError naming `where`."""
    if type_name == "int | str":  # an integer or "auto"
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        try:
            return _convert(value, "int", where, base_dir, from_env)
        except ConfigError:
            raise ConfigError(f"{where}: expected an integer or \"auto\", got {value!r}") from None
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if from_env and isinstance(value, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if type_name == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_env and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if type_name == "float":
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_env and isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if type_name == "Path":
        if not value.strip():
            raise ConfigError(f"{where}: expected a path, got an empty string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()
    return value


def _check_rules(value: Any, rules: Mapping[str, Any], where: str) -> None:
    if rules.get("auto") and value == AUTO:
        return
    if "min" in rules and value < rules["min"]:
        raise ConfigError(f"{where}: must be >= {rules['min']}, got {value!r}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"{where}: must be <= {rules['max']}, got {value!r}")
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(rules['choices'])}; got {value!r}")
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise ConfigError(f"{where}: must match {rules['pattern']}; got {value!r}")


def _apply(values: dict[str, dict[str, Any]], section: str, key: str, raw: Any, where: str, base_dir: Path,
           from_env: bool) -> None:
    spec = _field(section, key)
    # Annotations are strings under `from __future__ import annotations`: "int", "Path", ...
    value = _convert(raw, str(spec.type), where, base_dir, from_env)
    _check_rules(value, spec.metadata, where)
    values.setdefault(section, {})[key] = value


def _keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def _read_file(path: Path, values: dict[str, dict[str, Any]]) -> None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for key, raw in table.items():
            if key not in _keys(section):
                raise ConfigError(f"{path}: unknown key [{section}] {key}; known keys: {', '.join(_keys(section))}")
            _apply(values, section, key, raw, f"{path}: [{section}] {key}", path.parent, from_env=False)


def _read_env(env: Mapping[str, str], values: dict[str, dict[str, Any]]) -> None:
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in SECTIONS:
            continue  # not ours (e.g. a variable of another tool that shares the prefix)
        if key not in _keys(section):
            raise ConfigError(f"environment variable {name}: unknown key [{section}] {key}; "
                              f"known keys: {', '.join(_keys(section))}")
        _apply(values, section, key, raw, f"environment variable {name} ([{section}] {key})", Path.cwd(),
               from_env=True)


def _check_backend(backend: str, where: str) -> None:
    from cosyapp.engine.registry import backend_names

    if backend not in backend_names():
        raise ConfigError(f"{where}: unknown backend {backend!r}; choose one of {', '.join(backend_names())}")


def config_path(explicit: str | Path | None = None, env: Mapping[str, str] | None = None) -> Path | None:
    """The config file to read: the explicit one, else $COSYAPP_CONFIG, else the project's config.toml if present."""
    env = os.environ if env is None else env
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    if env.get("COSYAPP_CONFIG"):
        return Path(env["COSYAPP_CONFIG"]).expanduser().resolve()
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the config file (see `config_path`) and the COSYAPP_* environment. Raises ConfigError."""
    env = os.environ if env is None else env
    source = config_path(path, env)
    values: dict[str, dict[str, Any]] = {}
    if source is not None:
        _read_file(source, values)
    _read_env(env, values)
    sections = {name: SECTIONS[name](**values.get(name, {})) for name in SECTIONS}
    settings = Settings(**sections, source=source)
    _check_backend(settings.model.backend, "[model] backend")
    if settings.model.extra_backend:
        _check_backend(settings.model.extra_backend, "[model] extra_backend")
        if settings.model.extra_backend == settings.model.backend:
            raise ConfigError(f"[model] extra_backend: {settings.model.extra_backend!r} is already [model] backend")
    if settings.limits.min_prompt_s >= settings.limits.max_prompt_s:
        raise ConfigError(f"[limits] min_prompt_s ({settings.limits.min_prompt_s}) must be below "
                          f"max_prompt_s ({settings.limits.max_prompt_s})")
    if settings.cluster.min_replicas > settings.cluster.max_replicas:
        raise ConfigError(f"[cluster] min_replicas ({settings.cluster.min_replicas}) must be at most "
                          f"max_replicas ({settings.cluster.max_replicas})")
    return settings
