"""`cosyapp serve` (every flag), the client commands `synth` and `play` against it, and the streaming player.

`play` runs PyAudio for real on ALSA's null device (PortAudio is installed by scripts/setup.sh); the player
itself is also tested with an injected output stream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from click.testing import CliRunner

from cosyapp.cli import main
from cosyapp.client.player import PlayerUnavailable, PyAudioOutput, StreamingPlayer, play_stream

DEFAULT_PROMPT = Path(__file__).resolve().parents[2] / "asset" / "zero_shot_prompt.wav"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_serve_flags_override_the_config(served, tiny_cosyvoice2_dir: Path):
    url, _ = served
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok", "model_type": "CosyVoice2"}
    info = httpx.get(f"{url}/model_info", timeout=10).json()
    assert Path(info["model_dir"]).resolve() == tiny_cosyvoice2_dir.resolve()  # --model-dir beat the config


def test_synth_writes_a_wav_file(served, tmp_path: Path):
    url, _ = served
    out = tmp_path / "out.wav"
    code, output = _run("synth", "欢迎光临!请问您需要什么?", "-o", str(out), "--url", url)
    assert code == 0, output
    samples, rate = soundfile.read(out, dtype="int16")
    assert rate == 24000 and samples.ndim == 1 and len(samples) > 2400
    assert f"wrote {out}: {len(samples) / 24000:.2f} s at 24000 Hz" in output


def test_synth_raw_pcm_with_prompt_and_instruction(served, tmp_path: Path):
    url, _ = served
    out = tmp_path / "out.pcm"
    code, output = _run("synth", "您好,有什么可以帮您?", "-o", str(out), "--url", url, "--prompt-wav",
                        str(DEFAULT_PROMPT), "--instruction", "你是一位专业的客服人员。")
    assert code == 0, output
    assert out.stat().st_size > 0 and out.stat().st_size % 2 == 0
    code, output = _run("synth", "原神,启动!", "-o", str(tmp_path / "zs.pcm"), "--url", url,
                        "--prompt-wav", str(DEFAULT_PROMPT), "--prompt-text", "欢迎光临，请问您需要点什么？")
    assert code == 0, output


def test_synth_with_a_registered_speaker_and_cosyapp_url(served, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    url, config = served
    for name in list(os.environ):
        if name.startswith("COSYAPP_"):
            monkeypatch.delenv(name)
    # `speakers add` with the service's config writes into the data folder the running service reads.
    monkeypatch.setenv("COSYAPP_MODEL_MODEL_DIR", str(Path(httpx.get(f"{url}/model_info").json()["model_dir"])))
    code, output = _run("speakers", "add", "clerk", "--wav", str(DEFAULT_PROMPT), "--text",
                        "欢迎光临，请问您需要点什么？", "--config", str(config))
    assert code == 0, output
    assert httpx.get(f"{url}/model_info", timeout=10).json()["speakers"] == ["clerk"]
    monkeypatch.setenv("COSYAPP_URL", url)
    code, output = _run("synth", "今天天气真好", "-o", str(tmp_path / "s.wav"), "--speaker", "clerk")
    assert code == 0, output
    code, output = _run("synth", "今天天气真好", "-o", str(tmp_path / "s.wav"), "--speaker", "nobody")
    assert code == 1 and "400" in output and "unknown speaker 'nobody'" in output


def test_synth_reports_an_unreachable_service(tmp_path: Path):
    code, output = _run("synth", "你好", "-o", str(tmp_path / "x.wav"), "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the service at http://127.0.0.1:9" in output
    assert "Traceback" not in output


def test_serve_stops_on_a_bad_config_naming_the_key(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text("[engine]\nmax_concurrent = 0\n")
    code, output = _run("serve", "--config", str(config))
    assert code == 1 and "[engine] max_concurrent" in output and "must be >= 1" in output


# ------------------------------------------------------------------------------------------------ player


class RecordingOutput:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, frames: bytes) -> None:
        assert len(frames) % 2 == 0, "a write must hold whole samples"
        self.writes.append(frames)

    def close(self) -> None:
        self.closed = True


def test_player_writes_whole_samples_across_odd_chunk_boundaries():
    pcm = np.arange(-500, 500, dtype="<i2").tobytes()
    chunks = [pcm[:1], pcm[1:4], pcm[4:5], pcm[5:999], pcm[999:], b"\x07"]  # the last byte is a torn sample
    output = RecordingOutput()
    seconds = play_stream(chunks, sample_rate=1000, output=output)
    assert b"".join(output.writes) == pcm and output.closed
    assert seconds == pytest.approx(1.0)


def test_player_stereo_frames():
    output = RecordingOutput()
    player = StreamingPlayer(output, channels=2)
    for byte in bytes(range(10)):
        player.feed(bytes([byte]))
    player.close()
    assert [len(w) for w in output.writes] == [4, 4] and player.frames_played == 2


def test_play_without_pyaudio_says_how_to_install_it(served, monkeypatch: pytest.MonkeyPatch):
    url, _ = served
    monkeypatch.setitem(sys.modules, "pyaudio", None)  # makes `import pyaudio` fail
    with pytest.raises(PlayerUnavailable, match="pip install 'cosyapp\\[client\\]'"):
        PyAudioOutput(24000)
    code, output = _run("play", "你好", "--url", url)
    assert code == 1 and "pyaudio is not installed" in output and "portaudio19-dev" in output


NULL_ALSA_CONFIG = "</usr/share/alsa/alsa.conf>\npcm.!default { type null }\n"


def test_play_streams_through_pyaudio_on_a_null_device(served, tmp_path: Path):
    pytest.importorskip("pyaudio", reason="PyAudio not installed (scripts/setup.sh installs PortAudio + pyaudio)")
    if not Path("/usr/share/alsa/alsa.conf").is_file():
        pytest.skip("ALSA configuration not installed (libasound2-data); needed for the null device")
    url, _ = served
    alsa_config = tmp_path / "asound.conf"
    alsa_config.write_text(NULL_ALSA_CONFIG)
    env = {**os.environ, "ALSA_CONFIG_PATH": str(alsa_config)}
    result = subprocess.run([sys.executable, "-m", "cosyapp", "play", "欢迎光临!请问您需要什么?", "--url", url],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    seconds = float(result.stderr.split("played ")[1].split(" s")[0])
    assert seconds > 0.1
