"""config.toml loading: defaults, file values, COSYAPP_* overrides, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cosyapp.config import DEFAULT_CONFIG_FILE, PROJECT_ROOT, SECTIONS, ConfigError, Settings, load_settings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_config_documents_every_key_and_matches_the_defaults():
    text = DEFAULT_CONFIG_FILE.read_text(encoding="utf-8")
    settings = load_settings(DEFAULT_CONFIG_FILE, env={})
    defaults = Settings()
    for section, cls in SECTIONS.items():
        for key in cls.__dataclass_fields__:
            match = re.search(rf"\[{section}\][^\[]*?((?:#[^\n]*\n)+){key} = ", text)
            assert match, f"[{section}] {key} is missing from config.toml or has no comment above it"
            assert getattr(getattr(settings, section), key) == getattr(getattr(defaults, section), key), key
    assert settings.source == DEFAULT_CONFIG_FILE
    assert settings.server.port == 50000 and settings.server.host == "0.0.0.0"
    assert settings.defaults.prompt_wav == PROJECT_ROOT / "asset" / "zero_shot_prompt.wav"
    assert settings.defaults.instruction.endswith("<|endofprompt|>")


def test_file_values_and_relative_paths(tmp_path: Path):
    path = _write(tmp_path, '[server]\nport = 8080\n[model]\nmodel_dir = "models/cv2"\nwarmup = false\n'
                            '[limits]\nmax_upload_mb = 2\n[storage]\ndata_dir = "/srv/tts"\n')
    settings = load_settings(path, env={})
    assert settings.server.port == 8080 and settings.model.warmup is False
    assert settings.model.model_dir == tmp_path / "models" / "cv2"  # relative to the config file
    assert settings.storage.data_dir == Path("/srv/tts")
    assert settings.storage.speakers_dir == Path("/srv/tts/speakers")
    assert settings.limits.max_upload_bytes == 2 * 1024 * 1024
    assert settings.engine.max_concurrent == Settings().engine.max_concurrent  # untouched keys keep defaults


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "", "[server]\nport = 8080\n")
    env = {"COSYAPP_SERVER_PORT": "9090", "COSYAPP_ENGINE_MAX_CONCURRENT": "4", "COSYAPP_MODEL_WARMUP": "off",
           "COSYAPP_LIMITS_MAX_PROMPT_S": "12.5", "COSYAPP_STORAGE_DATA_DIR": "state",
           "COSYAPP_URL": "http://elsewhere", "COSYAPP_CONFIG": "/ignored/when/a/path/is/given"}
    settings = load_settings(path, env=env)
    assert settings.server.port == 9090 and settings.engine.max_concurrent == 4
    assert settings.model.warmup is False and settings.limits.max_prompt_s == 12.5
    assert settings.storage.data_dir == tmp_path / "state"  # relative to the working directory


def test_max_concurrent_is_a_number_or_auto(tmp_path: Path):
    assert Settings().engine.max_concurrent == "auto"
    assert load_settings(_write(tmp_path, "[engine]\nmax_concurrent = 'AUTO'\n"), env={}).engine.max_concurrent == "auto"
    assert load_settings(_write(tmp_path, "[engine]\nmax_concurrent = 12\n"), env={}).engine.max_concurrent == 12
    env = {"COSYAPP_ENGINE_MAX_CONCURRENT": "auto"}
    assert load_settings(_write(tmp_path, "[engine]\nmax_concurrent = 12\n"), env=env).engine.max_concurrent == "auto"


def test_config_file_from_the_environment(tmp_path: Path):
    path = _write(tmp_path, "[server]\nport = 7000\n")
    assert load_settings(env={"COSYAPP_CONFIG": str(path)}).server.port == 7000


@pytest.mark.parametrize("text, message", [
    ("[server]\nport = 'abc'\n", "[server] port: expected an integer, got 'abc'"),
    ("[server]\nport = 70000\n", "[server] port: must be <= 65535"),
    ("[server]\nprot = 1\n", "unknown key [server] prot"),
    ("[sever]\nport = 1\n", "unknown section [sever]"),
    ("[engine]\nmax_concurrent = 0\n", "[engine] max_concurrent: must be >= 1"),
    ("[engine]\nmax_concurrent = 'many'\n", '[engine] max_concurrent: expected an integer or "auto", got \'many\''),
    ("[engine]\nmax_queue = 1.5\n", "[engine] max_queue: expected an integer"),
    ("[limits]\nmax_prompt_s = nan\n", "[limits] max_prompt_s: expected a number"),
    ("[model]\nbackend = 'espnet'\n", "[model] backend: unknown backend 'espnet'"),
    ("[model]\ndevice = 'tpu'\n", "[model] device: must match"),
    ("[model]\ndtype = 'int8'\n", "[model] dtype: must be one of auto, float32, float16, bfloat16"),
    ("[model]\nwarmup = 'yes'\n", "[model] warmup: expected true or false"),
    ("[cosyvoice2]\nlm_weights = 'bf16'\n", "[cosyvoice2] lm_weights: must be one of auto, float, int8; got 'bf16'"),
    ("[cosyvoice3]\nlm_weights = 8\n", "[cosyvoice3] lm_weights: expected a string, got 8"),
    ("[model]\nmodel_dir = ''\n", "[model] model_dir: expected a path"),
    ("[defaults]\ninstruction = 3\n", "[defaults] instruction: expected a string"),
    ("[limits]\nmin_prompt_s = 20.0\nmax_prompt_s = 10.0\n", "min_prompt_s (20.0) must be below max_prompt_s"),
    ("server = 1\n", "[server] must be a table"),
    ("[server\nport = 1\n", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError) as error:
        load_settings(_write(tmp_path, text), env={})
    assert message in str(error.value)


@pytest.mark.parametrize("env, message", [
    ({"COSYAPP_SERVER_PORT": "eighty"}, "COSYAPP_SERVER_PORT ([server] port): expected an integer, got 'eighty'"),
    ({"COSYAPP_MODEL_WARMUP": "maybe"}, "COSYAPP_MODEL_WARMUP ([model] warmup): expected true or false"),
    ({"COSYAPP_SERVER_PROT": "1"}, "environment variable COSYAPP_SERVER_PROT: unknown key [server] prot"),
    ({"COSYAPP_LIMITS_MAX_UPLOAD_MB": "-1"}, "[limits] max_upload_mb): must be >= 0.01"),
])
def test_bad_environment_names_the_variable(env: dict[str, str], message: str):
    with pytest.raises(ConfigError) as error:
        load_settings(env=env)
    assert message in str(error.value)


def test_missing_explicit_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", env={})


def test_backend_options_come_from_the_backend_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "config.toml"
    config.write_text('[cosyvoice2]\ntext_frontend = "wetext"\nexact_final = true\n')
    monkeypatch.setenv("COSYAPP_COSYVOICE2_INCREMENTAL_FLOW", "false")
    options = load_settings(config).backend_options()
    assert options["text_frontend"] == "wetext"
    assert options["exact_final"] is True and options["incremental_flow"] is False
    assert options["tensorrt"] is True  # default kept


@pytest.mark.parametrize("choice", ["auto", "float", "int8"])
def test_lm_weights_choices(tmp_path: Path, choice: str):
    assert Settings().cosyvoice2.lm_weights == Settings().cosyvoice3.lm_weights == "auto"
    settings = load_settings(_write(tmp_path, f"[cosyvoice2]\nlm_weights = '{choice}'\n"), env={})
    assert settings.backend_options("cosyvoice2")["lm_weights"] == choice
    env = {"COSYAPP_COSYVOICE3_LM_WEIGHTS": choice}
    assert load_settings(_write(tmp_path, ""), env=env).backend_options("cosyvoice3")["lm_weights"] == choice
