"""`cosyapp speakers add | list | show | rename | remove` and `cosyapp prompts set-default | show`, with the real
backend on the tiny model computing the stored features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
import torch

from cosyapp.engine.registry import load_backend
from cosyapp.voices import SpeakerRegistry, load_voice

DEFAULT_PROMPT = Path(__file__).resolve().parents[2] / "asset" / "zero_shot_prompt.wav"


def test_speaker_lifecycle(cli, data_dir: Path, tiny_cosyvoice2_dir: Path):
    assert "no speakers registered" in cli("speakers", "list").output
    added = cli("speakers", "add", "clerk", "--wav", str(DEFAULT_PROMPT), "--text", "欢迎光临，请问您需要点什么？")
    assert "added speaker clerk" in added.output and "with transcript" in added.output
    cli("speakers", "add", "robot", "--wav", str(DEFAULT_PROMPT))

    folder = data_dir / "speakers" / "clerk"
    assert sorted(p.name for p in folder.iterdir()) == ["features.pt", "meta.json", "prompt.txt", "prompt.wav"]
    assert (folder / "prompt.txt").read_text(encoding="utf-8") == "欢迎光临，请问您需要点什么？"
    stored_audio, rate = soundfile.read(folder / "prompt.wav")
    original, original_rate = soundfile.read(DEFAULT_PROMPT)
    assert rate == original_rate and np.abs(stored_audio - original).max() < 1e-4

    # The stored features are exactly what the backend computes from the stored recording.
    backend = load_backend("cosyvoice2", tiny_cosyvoice2_dir, device="cpu")
    state = torch.load(folder / "features.pt", weights_only=True)
    fresh = backend.voice_state(backend.prepare_voice(stored_audio.astype(np.float32), rate, None))
    assert torch.equal(state["speech_token"], fresh["speech_token"])
    assert torch.allclose(state["speech_feat"], fresh["speech_feat"], atol=1e-5)
    assert torch.allclose(state["embedding"], fresh["embedding"], atol=1e-5)
    voice = load_voice(SpeakerRegistry(data_dir / "speakers").get("clerk"), backend)
    assert voice.text == "欢迎光临，请问您需要点什么？"

    listing = cli("speakers", "list").output.splitlines()
    assert [line.split()[0] for line in listing] == ["clerk", "robot"]
    shown = json.loads(cli("speakers", "show", "clerk").output)
    assert shown["id"] == "clerk" and shown["backend"] == "cosyvoice2" and shown["sample_rate"] == 24000
    assert shown["text"] == "欢迎光临，请问您需要点什么？" and shown["source_file"] == "zero_shot_prompt.wav"

    cli("speakers", "rename", "clerk", "waiter")
    assert [line.split()[0] for line in cli("speakers", "list").output.splitlines()] == ["robot", "waiter"]
    assert json.loads(cli("speakers", "show", "waiter").output)["text"] == "欢迎光临，请问您需要点什么？"
    cli("speakers", "remove", "robot")
    assert [line.split()[0] for line in cli("speakers", "list").output.splitlines()] == ["waiter"]
    assert sorted(p.name for p in (data_dir / "speakers").iterdir()) == ["waiter"]


def test_speaker_errors_are_one_clear_line(cli, data_dir: Path, tmp_path: Path):
    cli("speakers", "add", "one", "--wav", str(DEFAULT_PROMPT))
    cases = [
        (("speakers", "add", "../evil", "--wav", str(DEFAULT_PROMPT)), "invalid speaker id"),
        (("speakers", "add", ".hidden", "--wav", str(DEFAULT_PROMPT)), "invalid speaker id"),
        (("speakers", "add", "one", "--wav", str(DEFAULT_PROMPT)), "already exists"),
        (("speakers", "show", "nobody"), "unknown speaker 'nobody'"),
        (("speakers", "remove", "nobody"), "unknown speaker"),
        (("speakers", "rename", "one", "a/b"), "invalid speaker id"),
    ]
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    cases.append((("speakers", "add", "two", "--wav", str(not_audio)), "not a readable audio file"))
    long_wav = tmp_path / "long.wav"
    soundfile.write(long_wav, np.zeros(24000 * 31, dtype=np.float32), 24000)
    cases.append((("speakers", "add", "two", "--wav", str(long_wav)), "too long"))
    for args, message in cases:
        result = cli(*args, expect_ok=False)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)
    assert SpeakerRegistry(data_dir / "speakers").ids() == ["one"]
    assert not (tmp_path / "evil").exists()


def test_prompts_set_default_and_show(cli, data_dir: Path, tmp_path: Path):
    shown = cli("prompts", "show").output
    assert "instruction: 你是一位热情友好的餐馆店员" in shown and "[from config" in shown
    assert f"prompt_wav:  {DEFAULT_PROMPT}" in shown

    silence = tmp_path / "short.flac"
    soundfile.write(silence, np.zeros(2400, dtype=np.float32), 24000)  # 0.1 s: below min_prompt_s
    result = cli("prompts", "set-default", "--wav", str(silence), expect_ok=False)
    assert result.exit_code == 1 and "too short" in result.output and "Traceback" not in result.output
    assert "[from config" in cli("prompts", "show").output

    result = cli("prompts", "set-default", "--wav", str(DEFAULT_PROMPT), "--instruction", "no marker", expect_ok=False)
    assert result.exit_code == 1 and "<|endofprompt|>" in result.output

    instruction = "你是一位专业的新闻主播,声音清晰。<|endofprompt|>"
    cli("prompts", "set-default", "--wav", str(DEFAULT_PROMPT), "--instruction", instruction)
    shown = cli("prompts", "show").output
    assert f"instruction: {instruction}  [from prompts set-default]" in shown
    assert "from zero_shot_prompt.wav)  [from prompts set-default]" in shown
    first = (data_dir / "default_prompt").resolve()

    cli("prompts", "set-default", "--wav", str(DEFAULT_PROMPT))  # replaces it in one step
    second = (data_dir / "default_prompt").resolve()
    assert second != first and not first.exists()
    shown = cli("prompts", "show").output.splitlines()
    assert "[from config" in shown[0] and "[from prompts set-default]" in shown[1]  # no instruction this time

    assert "reset" in cli("prompts", "reset").output
    assert "[from prompts set-default]" not in cli("prompts", "show").output
    assert "no default prompt was set" in cli("prompts", "reset").output
