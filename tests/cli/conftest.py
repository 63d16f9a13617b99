"""CLI test fixtures: the `cosyapp` command run in-process with click's CliRunner against the tiny model, and
a real `cosyapp serve` (all its flags) for the client commands `synth` and `play`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cosyapp.cli import main
from cosyapp.service_process import ServiceStartError, free_port, start_service

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tiny_cosyvoice2_dir: Path, data_dir: Path):
    """`cli("speakers", "list")` -> click Result, with the model and data folder set through COSYAPP_*."""
    for name in list(os.environ):
        if name.startswith("COSYAPP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COSYAPP_CONFIG", str(REPO_ROOT / "config.toml"))
    monkeypatch.setenv("COSYAPP_MODEL_MODEL_DIR", str(tiny_cosyvoice2_dir))
    monkeypatch.setenv("COSYAPP_MODEL_DEVICE", "cpu")
    monkeypatch.setenv("COSYAPP_STORAGE_DATA_DIR", str(data_dir))

    def run(*args: str, expect_ok: bool = True) -> Result:
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        if expect_ok:
            assert result.exit_code == 0, f"cosyapp {' '.join(args)} failed:\n{result.output}"
        return result

    return run


@pytest.fixture(scope="module")
def served(tiny_cosyvoice2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`cosyapp serve --config --host --port --backend --model-dir` in a subprocess; yields (url, config path).

    The config file's own model_dir and port are wrong on purpose: the flags must win."""
    folder = tmp_path_factory.mktemp("served")
    config = folder / "config.toml"
    config.write_text(f'[server]\nport = 1\n[model]\nmodel_dir = "/nonexistent"\ndevice = "cpu"\n'
                      f'[engine]\nmax_concurrent = 1\n[storage]\ndata_dir = "{folder / "data"}"\n', encoding="utf-8")
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("COSYAPP_")}
    flags = ["--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--backend", "cosyvoice2",
             "--model-dir", str(tiny_cosyvoice2_dir)]
    try:
        with start_service(port, {**env, "OMP_NUM_THREADS": "2"}, folder / "serve.log", serve_args=flags) as service:
            yield service.url, config
    except ServiceStartError as e:
        pytest.fail(str(e), pytrace=False)
