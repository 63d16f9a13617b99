"""Parity of the CosyVoice3 LM with upstream: golden llm.npz (ladder 3).

lm_input is built from the frontend.npz ids (not through our frontend); the forced rows go through the KV-cache
path like upstream's; the seeded sampling must match token for token, including where and on which id it stops
(any id >= speech_token_size, with only the *sos* id banned before min_len), and the silence cap must cut the
synthetic token stream exactly like upstream's llm_job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.decoding import generate, stop_rule
from cosyapp.backends.cosyvoice2.llm import length_limits
from cosyapp.backends.cosyvoice2.sampling import RasSampler
from cosyapp.backends.cosyvoice3.config import CosyVoice3Config
from cosyapp.backends.cosyvoice3.decoding import SilenceCap
from cosyapp.backends.cosyvoice3.llm import CosyVoice3LM
from cosyapp.engine.types import ModelFileError

from parity_helpers import forced_hidden

MODES = ("zero_shot", "cross_lingual", "instruct2")
LOGP_ATOL = 1e-4  # README: logp (~35 range) within ~1e-4 abs for an independent float32 implementation
CAND_PROB_ATOL = 1e-5  # candidate probs are softmax(logp); our logp is within ~1e-5 of upstream's


@pytest.fixture(scope="module")
def llm_npz(cv3_npz) -> dict[str, np.ndarray]:
    return cv3_npz("llm")


@pytest.fixture(scope="module")
def frontend_npz(cv3_npz) -> dict[str, np.ndarray]:
    return cv3_npz("frontend")


@pytest.fixture(scope="module")
def lm(cosyvoice3_golden: Path) -> CosyVoice3LM:
    return CosyVoice3LM.from_pretrained(cosyvoice3_golden / "tiny")


def mode_ids(frontend: dict[str, np.ndarray], mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, prompt_text, prompt_speech_tokens) as upstream's LM saw them for `mode`."""
    empty = np.zeros((1, 0), dtype=np.int64)
    text = frontend[f"{mode}__text"]
    prompt_text = frontend.get(f"{mode}__prompt_text", empty)
    speech = frontend.get(f"{mode}__llm_prompt_speech_token", empty)
    return torch.from_numpy(text), torch.from_numpy(prompt_text), torch.from_numpy(speech)


def lm_input_for(lm: CosyVoice3LM, frontend: dict[str, np.ndarray], mode: str) -> torch.Tensor:
    return lm.build_lm_input(*mode_ids(frontend, mode))


@pytest.mark.parametrize("mode", MODES)
def test_lm_input(lm, llm_npz, frontend_npz, cv3_settings, mode):
    lm_input = lm_input_for(lm, frontend_npz, mode)
    expected = torch.from_numpy(llm_npz[f"{mode}__lm_input"])
    assert lm_input.shape == (1, *expected.shape)
    assert lm_input.shape[1] == cv3_settings["llm"]["per_mode"][mode]["lm_input_len"]
    assert torch.equal(lm_input[0], expected)  # pure embedding lookups: bitwise
    text, prompt_text, _ = mode_ids(frontend_npz, mode)
    assert cv3_settings["endofprompt_id_hardcoded"] in torch.cat([prompt_text[0], text[0]]).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_length_limits(frontend_npz, cv3_settings, mode):
    text, _, _ = mode_ids(frontend_npz, mode)
    per_mode = cv3_settings["llm"]["per_mode"][mode]
    assert length_limits(text.numel()) == (per_mode["min_len"], per_mode["max_len"])


@pytest.mark.parametrize("mode", MODES)
def test_forced_logp(lm, llm_npz, frontend_npz, cv3_settings, mode):
    forced = torch.from_numpy(llm_npz["forced_tokens"])
    assert len(forced) == cv3_settings["n_forced"]
    hidden = forced_hidden(lm, lm_input_for(lm, frontend_npz, mode), forced)
    with torch.inference_mode():
        logits = lm.llm_decoder(hidden)
        logp = lm.speech_logp(hidden)
    expected_logp = torch.from_numpy(llm_npz[f"{mode}__forced_logp"])
    assert logp.shape == expected_logp.shape == (len(forced) + 1, cv3_settings["llm_decoder_out"])
    torch.testing.assert_close(logp, expected_logp, atol=LOGP_ATOL, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), torch.from_numpy(llm_npz[f"{mode}__forced_logits_logsumexp"]),
                               atol=LOGP_ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), torch.from_numpy(llm_npz[f"{mode}__forced_argmax"]))


@pytest.mark.parametrize("mode", MODES)
def test_seeded_generate_stops_like_upstream(lm, llm_npz, frontend_npz, cv3_settings, mode):
    """The product loop: every token upstream yielded, then the same stop (maybe before min_len)."""
    lm_input = lm_input_for(lm, frontend_npz, mode)
    per_mode = cv3_settings["llm"]["per_mode"][mode]
    expected = llm_npz[f"{mode}__sampled_tokens"].tolist()
    assert len(expected) == per_mode["sampled_n_tokens"]
    torch.manual_seed(cv3_settings["sampling"]["seed"])
    assert list(generate(lm, lm_input, per_mode["min_len"], per_mode["max_len"])) == expected
    # The same stream from a dedicated generator leaves the global one alone.
    before = torch.get_rng_state()
    tokens = generate(lm, lm_input, per_mode["min_len"], per_mode["max_len"],
                         generator=torch.Generator().manual_seed(cv3_settings["sampling"]["seed"]))
    assert list(tokens) == expected
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_steps(lm, llm_npz, frontend_npz, cv3_settings, mode):
    """Every per-step array of the seeded run: ban flag, nucleus candidates and probs, pick, RAS fallback, the
    step's id (the last one is the stop id, >= speech_token_size)."""
    lm_input = lm_input_for(lm, frontend_npz, mode)
    per_mode = cv3_settings["llm"]["per_mode"][mode]
    prefix = f"{mode}__sampled"
    n_steps = len(llm_npz[f"{prefix}_ids_all"])
    assert n_steps == per_mode["sampled_n_steps"]
    rule = stop_rule(lm, per_mode["min_len"], per_mode["max_len"])
    top_k, length = lm.config.top_k, lm_input.shape[1]
    lm.setup_cache(1, length + n_steps)
    sampler = RasSampler(lm.config.top_p, top_k, lm.config.win_size, lm.config.tau_r)
    ids, banned, picks, fallbacks, cand_ids, cand_probs = [], [], [], [], [], []
    torch.manual_seed(cv3_settings["sampling"]["seed"])
    with torch.inference_mode():
        hidden = lm(lm_input, torch.arange(length)[None], 0, length)
        for step in range(n_steps):
            scores = lm.speech_logp(hidden[0, -1])
            ban = rule.banned(step)
            banned.append(int(ban is not None))
            if ban is not None:
                assert ban == (cv3_settings["sos"], cv3_settings["sos"] + 1)  # upstream quirk: the sos id only
                scores[ban[0]:ban[1]] = float("-inf")
            sample = sampler(scores)
            keep = torch.arange(top_k) < sample.num_candidates
            ids.append(sample.token_id)
            picks.append(int(sample.nucleus_pick))
            fallbacks.append(int(sample.fallback))
            cand_ids.append(torch.where(keep, sample.sorted_ids, -1))
            cand_probs.append(torch.where(keep, sample.sorted_probs, 0.0))
            x = lm.speech_embedding(sample.token)[None]
            hidden = lm(x, torch.tensor([[length + step]]), 0, length + step + 1)
    assert ids == llm_npz[f"{prefix}_ids_all"].tolist()
    assert [rule.is_stop(i) for i in ids] == [False] * (n_steps - 1) + [True]
    assert ids[-1] == per_mode["sampled_stop_id"]
    assert (n_steps - 1 < per_mode["min_len"]) == per_mode["sampled_stopped_before_min_len"]
    assert banned == llm_npz[f"{prefix}_ignore_eos"].tolist()
    assert picks == llm_npz[f"{prefix}_nucleus_pick"].tolist()
    assert fallbacks == llm_npz[f"{prefix}_fallback"].tolist()
    assert sum(fallbacks) == per_mode["sampled_n_fallback"]
    assert torch.equal(torch.stack(cand_ids), torch.from_numpy(llm_npz[f"{prefix}_nucleus_cand_ids"]))
    torch.testing.assert_close(torch.stack(cand_probs), torch.from_numpy(llm_npz[f"{prefix}_nucleus_cand_probs"]),
                               atol=CAND_PROB_ATOL, rtol=0)


def test_stop_ids(lm, cv3_settings):
    rule = stop_rule(lm, 0, 10)
    stop_ids = range(cv3_settings["speech_token_size"], cv3_settings["llm_decoder_out"])
    assert all(rule.is_stop(i) for i in stop_ids)
    assert not rule.is_stop(cv3_settings["speech_token_size"] - 1)
    assert lm.llm_decoder.out_features == lm.speech_embedding.num_embeddings == cv3_settings["speech_embedding_rows"]
    assert lm.llm_decoder.bias is None


def test_silence_cap(llm_npz, cv3_settings):
    cap = SilenceCap(cv3_settings["silent_tokens"], cv3_settings["max_silent_token_num"])
    out = list(cap.filter(llm_npz["silent_filter_input"].tolist()))
    assert out == llm_npz["silent_filter_output"].tolist()
    assert list(SilenceCap().filter(llm_npz["silent_filter_input"].tolist())) == out  # the built-in defaults


def test_mismatched_checkpoint_names_llm_pt(cosyvoice3_golden, tmp_path):
    config = CosyVoice3Config.from_model_dir(cosyvoice3_golden / "tiny")
    state = torch.load(cosyvoice3_golden / "tiny" / "llm.pt", map_location="cpu", weights_only=True)
    state["llm_decoder.weightz"] = state.pop("llm_decoder.weight")
    torch.save({k: v.clone() for k, v in state.items()}, tmp_path / "llm.pt")
    with pytest.raises(ModelFileError, match=r"llm\.pt.*llm_decoder\.weight"):
        CosyVoice3LM.from_pretrained(tmp_path, config)


def test_bad_yaml_is_named(tmp_path):
    (tmp_path / "cosyvoice3.yaml").write_text("llm: [unclosed\n")
    with pytest.raises(ModelFileError, match="cosyvoice3.yaml"):
        CosyVoice3Config.from_model_dir(tmp_path)
    with pytest.raises(ModelFileError, match="cosyvoice3.yaml"):
        CosyVoice3Config.from_model_dir(tmp_path / "missing")
