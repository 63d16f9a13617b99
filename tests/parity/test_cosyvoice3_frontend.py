"""Parity of the CosyVoice3 frontend with upstream: golden frontend.npz and settings.json strings (ladder 1-2).

The prompt features are CosyVoice2's code (checked in depth by test_cosyvoice2_frontend.py); what is new here is
the tokenizer's specials, the v3 speech tokenizer, the 12 kHz prompt mel and the per-mode `<|endofprompt|>`
prefix, so every array is recomputed from `prompt.wav` and `texts_raw` and compared with the README's tolerances.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from cosyapp.backends.cosyvoice2.features import prompt_mel, resample, speaker_fbank, whisper_log_mel
from cosyapp.backends.cosyvoice2.text import normalize_sentences, normalize_whole
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.cosyvoice3.frontend import CosyVoice3Frontend, VoiceFeatures
from cosyapp.engine.types import Mode, ModelFileError

from parity_helpers import assert_close, assert_equal, assert_model_input

FEATURE_ATOL = 1e-4  # README: frontend features within ~1e-4 abs for an independent float32 implementation
MODES = ("zero_shot", "cross_lingual", "instruct2")
FRONTEND_FILES = ("campplus.onnx", "speech_tokenizer_v3.onnx", "cosyvoice3.yaml", "CosyVoice-BlankEN/config.json",
                  "CosyVoice-BlankEN/vocab.json", "CosyVoice-BlankEN/merges.txt",
                  "CosyVoice-BlankEN/tokenizer_config.json")


@pytest.fixture(scope="module")
def golden(cv3_npz) -> dict[str, np.ndarray]:
    return cv3_npz("frontend")


@pytest.fixture(scope="module")
def frontend(cosyvoice3_golden: Path) -> CosyVoice3Frontend:
    model_dir = cosyvoice3_golden / "tiny"
    return CosyVoice3Frontend(model_dir, CosyVoice3Config.from_model_dir(model_dir), device="cpu")


@pytest.fixture(scope="module")
def prompt(cosyvoice3_golden: Path) -> tuple[np.ndarray, int]:
    wav, sample_rate = sf.read(cosyvoice3_golden / "prompt.wav", dtype="float32")
    return wav, sample_rate


@pytest.fixture(scope="module")
def voice(frontend: CosyVoice3Frontend, prompt: tuple[np.ndarray, int]) -> VoiceFeatures:
    return frontend.extract_voice(*prompt)


# ---- text (ladder 1) ----------------------------------------------------------------------------------


def test_special_token_ids(frontend: CosyVoice3Frontend, cv3_settings: dict) -> None:
    assert frontend.tokenizer.vocab_size == cv3_settings["tokenizer_len"]
    for token, token_id in cv3_settings["tokenizer_special_ids"].items():
        assert frontend.tokenizer.token_id(token) == token_id, token
    assert frontend.tokenizer.token_id("<|endofprompt|>") == cv3_settings["endofprompt_id_hardcoded"]


def test_offline_normalisation_strings(frontend: CosyVoice3Frontend, cv3_settings: dict) -> None:
    count = frontend.tokenizer.count
    for key, ref in cv3_settings["text_normalize"]["offline_no_tn_engine"].items():
        raw = cv3_settings["texts_raw"][key]
        sentences = normalize_sentences(raw, count)
        assert sentences == ref["split"], key
        assert normalize_whole(raw, count) == ref["no_split"], key
        assert [frontend.tokenizer.encode(s) for s in sentences] == ref["split_token_ids"], key


def test_sentence_token_ids(frontend: CosyVoice3Frontend, cv3_settings: dict, golden: dict[str, np.ndarray]) -> None:
    keys = [k for k in golden if k.startswith("text__")]
    references = cv3_settings["text_normalize"]["offline_no_tn_engine"].values()
    assert len(keys) == sum(len(ref["split"]) for ref in references)
    for name in keys:
        key, index = re.fullmatch(r"text__(.+)__sent(\d+)", name).groups()
        sentences = frontend.text_sentences(cv3_settings["texts_raw"][key])
        assert_equal(sentences[int(index)], golden[name], name)


# ---- prompt features (ladder 2) -----------------------------------------------------------------------


def test_prompt_features(frontend: CosyVoice3Frontend, prompt: tuple[np.ndarray, int],
                         golden: dict[str, np.ndarray]) -> None:
    wav, sample_rate = prompt
    wav_16k = resample(torch.from_numpy(wav), sample_rate, 16000)
    assert_close(wav_16k, golden["prompt_speech_16k"], FEATURE_ATOL, "prompt_speech_16k")
    wav_24k = resample(torch.from_numpy(wav), sample_rate, frontend.config.mel.sampling_rate)
    assert_close(wav_24k, golden["prompt_speech_24k"], FEATURE_ATOL, "prompt_speech_24k")
    # fmax null: the mel reaches 12 kHz (CosyVoice2's stops at 8 kHz).
    assert frontend.config.mel.fmax is None
    assert_close(prompt_mel(wav_24k, frontend.config.mel), golden["prompt_speech_feat_raw"], FEATURE_ATOL,
                 "prompt_speech_feat_raw")
    log_mel = whisper_log_mel(wav_16k)
    assert_close(log_mel.unsqueeze(0), golden["prompt_whisper_logmel128"], FEATURE_ATOL, "prompt_whisper_logmel128")
    assert_equal([log_mel.shape[1]], golden["prompt_whisper_logmel128_len"], "prompt_whisper_logmel128_len")
    assert_equal(frontend._speech_tokens(log_mel).unsqueeze(0), golden["prompt_speech_token_raw"],
                 "prompt_speech_token_raw")
    # CAM++ on upstream's exact fbank (the fbank itself is CosyVoice2's code and test).
    assert speaker_fbank(wav_16k).shape == golden["prompt_campplus_fbank"].shape[1:]
    embedding = frontend._speaker_embedding(torch.from_numpy(golden["prompt_campplus_fbank"][0]))
    assert_close(embedding.unsqueeze(0), golden["prompt_campplus_embedding"], FEATURE_ATOL, "prompt_campplus_embedding")


def test_prompt_trim(voice: VoiceFeatures, cv3_settings: dict) -> None:
    trim = cv3_settings["prompt_trim"]
    assert voice.speech_token.shape[1] == trim["token_len"]
    assert voice.speech_feat.shape[1] == 2 * trim["token_len"]


@pytest.mark.parametrize("mode", MODES)
def test_model_input(mode: str, frontend: CosyVoice3Frontend, voice: VoiceFeatures, cv3_settings: dict,
                     golden: dict[str, np.ndarray]) -> None:
    """Upstream's API calls, each with its `<|endofprompt|>` carrier: the prompt text (zero_shot), the tts text
    itself (cross_lingual, used raw because it holds a tag) and the instruction (instruct2)."""
    spec = cv3_settings["modes"][mode]
    text_ids = frontend.text_sentences(cv3_settings["texts_raw"][spec["tts_text_key"]])[0]
    prompt_ids = {
        "zero_shot": lambda: frontend.prompt_text_ids(cv3_settings["texts_raw"]["prompt_text"]),
        "cross_lingual": lambda: None,
        "instruct2": lambda: frontend.instruction_ids(cv3_settings["texts_raw"]["instruct"]),
    }[mode]()
    model_input = frontend.build_model_input(Mode(mode), text_ids, voice, prompt_ids)

    assert_model_input(model_input, spec["model_input_keys"], golden, mode, FEATURE_ATOL)


def test_prompt_prefix_is_added_when_missing(frontend: CosyVoice3Frontend, voice: VoiceFeatures,
                                             cv3_settings: dict) -> None:
    """Without `<|endofprompt|>` the LM would fail; each mode gets upstream's example prefix."""
    endofprompt = cv3_settings["endofprompt_id_hardcoded"]
    raw_prompt = cv3_settings["texts_raw"]["prompt_text"]
    transcript = raw_prompt.split("<|endofprompt|>")[-1]
    assert frontend.prompt_text_ids(transcript) == frontend.prompt_text_ids(raw_prompt)
    assert endofprompt in frontend.instruction_ids("Speak slowly.")
    # Without the tag the transcript is normalised (digits spelled out) before the prefix goes in front.
    assert frontend.prompt_text_ids("Room 7.") == frontend.tokenizer.encode("You are a helpful assistant."
                                                                             "<|endofprompt|>Room seven.")
    text_ids = frontend.text_sentences("Hello there.")[0]
    model_input = frontend.build_model_input(Mode.CROSS_LINGUAL, text_ids, voice)
    assert endofprompt in model_input.text[0].tolist()
    assert model_input.text[0, -len(text_ids):].tolist() == text_ids


@pytest.mark.parametrize("victim", FRONTEND_FILES[:2] + FRONTEND_FILES[4:])
def test_bad_model_file_is_named(victim: str, cosyvoice3_golden: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    for name in FRONTEND_FILES:
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cosyvoice3_golden / "tiny" / name, model_dir / name)
    config = CosyVoice3Config.from_model_dir(model_dir)
    (model_dir / victim).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelFileError, match=re.escape(victim.split("/")[-1])):
        CosyVoice3Frontend(model_dir, config)
