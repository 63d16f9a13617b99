"""`cosyapp models pull | list | verify | make-tiny`.

`pull` downloads from a local fake Hugging Face hub (tests/cli/fake_hub.py) through the real
huggingface_hub.snapshot_download, selected with HF_ENDPOINT like any mirror."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub

REPO_ID = "FunAudioLLM/CosyVoice2-0.5B"


def test_models_list_shows_sources_and_the_configured_model(cli, tiny_cosyvoice2_dir: Path):
    output = cli("models", "list").output
    assert "FunAudioLLM/CosyVoice2-0.5B" in output and "iic/CosyVoice2-0.5B" in output
    assert "fishaudio/openaudio-s1-mini" in output and "FunAudioLLM/Fun-CosyVoice3-0.5B-2512" in output
    assert f"Configured: backend=cosyvoice2 model_dir={tiny_cosyvoice2_dir} (present)" in output


def test_models_verify_accepts_the_tiny_model(cli, tiny_cosyvoice2_dir: Path):
    output = cli("models", "verify", str(tiny_cosyvoice2_dir)).output
    assert "llm.pt: loaded" in output and "flow.pt: loaded" in output
    assert output.strip().endswith(f"ok: {tiny_cosyvoice2_dir} is a valid cosyvoice2 model directory")


def test_models_verify_names_a_missing_file(cli, tiny_cosyvoice2_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_cosyvoice2_dir, broken)
    (broken / "hift.pt").unlink()
    result = cli("models", "verify", str(broken), expect_ok=False)
    assert result.exit_code == 1
    assert "hift.pt" in result.output and "Traceback" not in result.output


def test_models_make_tiny_writes_a_loadable_model(cli, tmp_path: Path):
    out = tmp_path / "tiny"
    output = cli("models", "make-tiny", str(out), "--backend", "cosyvoice2", "--size", "tiny").output
    assert "random tiny cosyvoice2 model" in output
    assert (out / "cosyvoice2.yaml").is_file() and (out / "CosyVoice-BlankEN").is_dir()
    assert "ok:" in cli("models", "verify", str(out)).output


def test_models_pull_rejects_modelscope_for_fish(cli, tmp_path: Path):
    result = cli("models", "pull", "fish", "--source", "modelscope", "--dir", str(tmp_path), expect_ok=False)
    assert result.exit_code == 1 and "Hugging Face only" in result.output


@pytest.fixture
def fake_hub(tiny_cosyvoice2_dir: Path, tmp_path: Path):
    """The tiny model published as FunAudioLLM/CosyVoice2-0.5B, plus files outside the official layout."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_cosyvoice2_dir, repo)
    (repo / "README.md").write_text("model card")
    (repo / "asset").mkdir()
    (repo / "asset" / "zero_shot_prompt.wav").write_bytes(b"not needed by cosyapp")
    hub = FakeHub(REPO_ID, repo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = hub.start(port)
    yield hub, url
    hub.stop()


def _pull(url: str, target: Path, home: Path, backend: str = "cosyvoice2") -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("COSYAPP_", "HF_"))}
    env.update({"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"})
    return subprocess.run([sys.executable, "-m", "cosyapp", "models", "pull", backend, "--source", "hf",
                           "--dir", str(target)], env=env, capture_output=True, text=True, timeout=300)


def test_models_pull_downloads_the_official_layout_then_verifies(fake_hub, tiny_cosyvoice2_dir: Path, tmp_path: Path):
    hub, url = fake_hub
    hub.interrupt.add("flow.pt")  # the connection drops halfway through the biggest file
    target = tmp_path / "CosyVoice2-0.5B"
    result = _pull(url, target, tmp_path / "hf_home")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"downloading {REPO_ID} from Hugging Face" in result.stdout
    assert "Fetching" in result.stderr  # huggingface_hub's progress bar
    assert "llm.pt: loaded" in result.stdout and f"ok: {target}" in result.stdout
    for source in tiny_cosyvoice2_dir.rglob("*"):
        if source.is_file():
            copy = target / source.relative_to(tiny_cosyvoice2_dir)
            assert copy.read_bytes() == source.read_bytes(), copy
    # Only the official layout is downloaded.
    assert not (target / "README.md").exists() and not (target / "asset").exists()
    assert "README.md" not in hub.downloads()

    # Running it again finds everything in place and downloads nothing.
    hub.requests.clear()
    again = _pull(url, target, tmp_path / "hf_home")
    assert again.returncode == 0, again.stdout + again.stderr
    assert hub.downloads() == []


def test_models_pull_cosyvoice3(tiny_cosyvoice3_dir: Path, tmp_path: Path):
    """Fun-CosyVoice3-0.5B-2512: the official layout only (not the unused llm.rl.pt), then verified."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_cosyvoice3_dir, repo)
    shutil.copyfile(repo / "llm.pt", repo / "llm.rl.pt")
    hub = FakeHub("FunAudioLLM/Fun-CosyVoice3-0.5B-2512", repo)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = hub.start(port)
    try:
        target = tmp_path / "Fun-CosyVoice3-0.5B"
        result = _pull(url, target, tmp_path / "hf_home", backend="cosyvoice3")
    finally:
        hub.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "llm.pt: loaded" in result.stdout and f"ok: {target}" in result.stdout
    assert (target / "speech_tokenizer_v3.onnx").is_file() and not (target / "llm.rl.pt").exists()


def test_models_pull_reports_an_unreachable_hub(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    result = _pull(f"http://127.0.0.1:{port}", tmp_path / "model", tmp_path / "hf_home")
    assert result.returncode == 1
    assert "download of FunAudioLLM/CosyVoice2-0.5B failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_build_trt_explains_when_tensorrt_is_missing(cli, tiny_cosyvoice2_dir: Path):
    from cosyapp.accel.trt import trt_unavailable_reason

    reason = trt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the build itself is covered by tests/unit/test_trt.py")
    result = cli("models", "build-trt", str(tiny_cosyvoice2_dir), expect_ok=False)
    assert result.exit_code == 1
    assert "cannot build TensorRT engines here" in result.output and reason in result.output
