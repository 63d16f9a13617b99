"""Parity of the CosyVoice2 LM (Qwen2 + speech head + RAS sampling) with upstream: golden llm.npz.

lm_input is built from the frontend.npz token ids (not through our frontend), the forced rows go through
the incremental KV-cache path like upstream's did, and the seeded sampling must match token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyapp.backends.cosyvoice2.decoding import generate
from cosyapp.backends.cosyvoice2.config import CosyVoice2Config
from cosyapp.backends.cosyvoice2.llm import CosyVoice2LM, length_limits
from cosyapp.backends.cosyvoice2.sampling import RasSampler
from cosyapp.engine.types import ModelFileError

from parity_helpers import forced_hidden

MODES = ("zero_shot", "cross_lingual", "instruct2")
LOGP_ATOL = 1e-4  # README: logp within ~1e-4 abs for an independent float32 implementation
# Candidate probs are softmax(logp); our logp differs from upstream's by <~1e-5, so the probs by less.
CAND_PROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def llm_npz(cosyvoice2_golden: Path) -> dict[str, np.ndarray]:
    return dict(np.load(cosyvoice2_golden / "llm.npz"))


@pytest.fixture(scope="module")
def frontend_npz(cosyvoice2_golden: Path) -> dict[str, np.ndarray]:
    return dict(np.load(cosyvoice2_golden / "frontend.npz"))


@pytest.fixture(scope="module")
def lm(cosyvoice2_golden: Path) -> CosyVoice2LM:
    return CosyVoice2LM.from_pretrained(cosyvoice2_golden / "tiny")


def mode_ids(frontend: dict[str, np.ndarray], mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text, prompt_text, prompt_speech_tokens) as upstream's LM saw them for `mode` (README quirk 2)."""
    empty = np.zeros((1, 0), dtype=np.int64)
    text = frontend[f"{mode}__text"]
    prompt_text = frontend.get(f"{mode}__prompt_text", empty)
    speech = frontend["zero_shot__llm_prompt_speech_token"] if mode == "zero_shot" else empty
    return torch.from_numpy(text), torch.from_numpy(prompt_text), torch.from_numpy(speech)


def lm_input_for(lm: CosyVoice2LM, frontend: dict[str, np.ndarray], mode: str) -> torch.Tensor:
    return lm.build_lm_input(*mode_ids(frontend, mode))


@pytest.mark.parametrize("mode", MODES)
def test_lm_input(lm, llm_npz, frontend_npz, settings, mode):
    lm_input = lm_input_for(lm, frontend_npz, mode)
    expected = torch.from_numpy(llm_npz[f"{mode}__lm_input"])
    assert lm_input.shape == (1, *expected.shape)
    assert lm_input.shape[1] == settings["llm"]["per_mode"][mode]["lm_input_len"]
    assert torch.equal(lm_input[0], expected)  # pure embedding lookups: bitwise


@pytest.mark.parametrize("mode", MODES)
def test_length_limits(frontend_npz, settings, mode):
    text, _, _ = mode_ids(frontend_npz, mode)
    per_mode = settings["llm"]["per_mode"][mode]
    assert length_limits(text.numel()) == (per_mode["min_len"], per_mode["max_len"])


@pytest.mark.parametrize("mode", MODES)
def test_forced_logp_incremental(lm, llm_npz, frontend_npz, settings, mode):
    forced = torch.from_numpy(llm_npz["forced_tokens"])
    hidden = forced_hidden(lm, lm_input_for(lm, frontend_npz, mode), forced)
    with torch.inference_mode():
        logits = lm.llm_decoder(hidden)
        logp = lm.speech_logp(hidden)
    expected_logp = torch.from_numpy(llm_npz[f"{mode}__forced_logp"])
    assert len(forced) == settings["n_forced"]
    # One row per forced token and one after the prompt; the speech head's columns end with the stop tokens.
    assert logp.shape == expected_logp.shape == (len(forced) + 1, max(settings["stop_token_ids"]) + 1)
    torch.testing.assert_close(logp, expected_logp, atol=LOGP_ATOL, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), torch.from_numpy(llm_npz[f"{mode}__forced_logits_logsumexp"]),
                               atol=LOGP_ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), torch.from_numpy(llm_npz[f"{mode}__forced_argmax"]))


@pytest.mark.parametrize("mode", MODES)
def test_full_sequence_matches_incremental(lm, llm_npz, frontend_npz, mode):
    forced = torch.from_numpy(llm_npz["forced_tokens"])
    lm_input = lm_input_for(lm, frontend_npz, mode)
    incremental = forced_hidden(lm, lm_input, forced)
    with torch.inference_mode():
        full_input = torch.cat([lm_input, lm.speech_embedding(forced)[None]], dim=1)
        length = full_input.shape[1]
        full = lm(full_input, torch.arange(length)[None], 0, length)[0, lm_input.shape[1] - 1:]
        torch.testing.assert_close(lm.speech_logp(full), lm.speech_logp(incremental), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_seeded_generate_tokens(lm, llm_npz, frontend_npz, settings, mode):
    lm_input = lm_input_for(lm, frontend_npz, mode)
    min_len, max_len = length_limits(mode_ids(frontend_npz, mode)[0].numel())
    expected = llm_npz[f"{mode}__sampled_tokens"].tolist()
    assert len(expected) == settings["sampling"]["n_steps"]
    seed = settings["sampling"]["seed"]
    torch.manual_seed(seed)
    tokens = generate_n(lm, lm_input, min_len, max_len, len(expected))
    assert tokens == expected
    # The same stream from a dedicated generator, leaving the global one (seeded differently) alone.
    torch.manual_seed(seed + 1)
    before = torch.get_rng_state()
    tokens = generate_n(lm, lm_input, min_len, max_len, len(expected), torch.Generator().manual_seed(seed))
    assert tokens == expected
    assert torch.equal(torch.get_rng_state(), before)


def generate_n(lm: CosyVoice2LM, lm_input: torch.Tensor, min_len: int, max_len: int, n: int,
               generator: torch.Generator | None = None) -> list[int]:
    tokens = []
    for token in generate(lm, lm_input, min_len, max_len, generator=generator):
        tokens.append(token)
        if len(tokens) == n:
            break
    return tokens


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_steps(lm, llm_npz, frontend_npz, settings, mode):
    """Every per-step array of the seeded run: nucleus candidates and probs, nucleus pick, RAS fallback."""
    lm_input = lm_input_for(lm, frontend_npz, mode)
    min_len, _ = length_limits(mode_ids(frontend_npz, mode)[0].numel())
    n_steps = settings["sampling"]["n_steps"]
    top_k = lm.config.top_k
    eos = lm.config.speech_token_size
    length = lm_input.shape[1]
    lm.setup_cache(1, length + n_steps)
    sampler = RasSampler.from_config(lm.config)
    picks, fallbacks, tokens, num_candidates, cand_ids, cand_probs = [], [], [], [], [], []
    torch.manual_seed(settings["sampling"]["seed"])
    with torch.inference_mode():
        hidden = lm(lm_input, torch.arange(length)[None], 0, length)
        for step in range(n_steps):
            scores = lm.speech_logp(hidden[0, -1])
            assert step < min_len  # the golden steps all mask EOS
            scores[eos] = float("-inf")
            sample = sampler(scores)
            keep = torch.arange(top_k) < sample.num_candidates
            picks.append(int(sample.nucleus_pick))
            fallbacks.append(int(sample.fallback))
            tokens.append(sample.token_id)
            num_candidates.append(sample.num_candidates)
            cand_ids.append(torch.where(keep, sample.sorted_ids, -1))
            cand_probs.append(torch.where(keep, sample.sorted_probs, 0.0))
            x = lm.speech_embedding(sample.token)[None]
            hidden = lm(x, torch.tensor([[length + step]]), 0, length + step + 1)
    prefix = f"{mode}__sampled"
    assert tokens == llm_npz[f"{prefix}_tokens"].tolist()
    assert picks == llm_npz[f"{prefix}_nucleus_pick"].tolist()
    assert fallbacks == llm_npz[f"{prefix}_fallback"].tolist()
    assert sum(fallbacks) == settings["llm"]["per_mode"][mode]["sampled_n_fallback"]
    assert num_candidates == settings["llm"]["per_mode"][mode]["sampled_n_candidates"]
    assert torch.equal(torch.stack(cand_ids), torch.from_numpy(llm_npz[f"{prefix}_nucleus_cand_ids"]))
    torch.testing.assert_close(torch.stack(cand_probs), torch.from_numpy(llm_npz[f"{prefix}_nucleus_cand_probs"]),
                               atol=CAND_PROB_ATOL, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_sampler_bitwise_on_golden_logp(llm_npz, settings, mode):
    """Step 0 of the seeded run sees forced_logp row 0 (same lm_input, nothing fed yet): from upstream's
    own log-probs, our sampler must give bitwise the same candidate probs and the same draw."""
    scores = torch.from_numpy(llm_npz[f"{mode}__forced_logp"][0].copy())
    scores[settings["eos_token"]] = float("-inf")
    sampling = settings["sampling"]
    sampler = RasSampler(top_p=sampling["top_p"], top_k=sampling["top_k"], win_size=sampling["win_size"],
                         tau_r=sampling["tau_r"], generator=torch.Generator().manual_seed(sampling["seed"]))
    sample = sampler(scores)
    k = sample.num_candidates
    prefix = f"{mode}__sampled"
    assert k == settings["llm"]["per_mode"][mode]["sampled_n_candidates"][0]
    assert torch.equal(sample.sorted_probs[:k], torch.from_numpy(llm_npz[f"{prefix}_nucleus_cand_probs"][0, :k]))
    assert torch.equal(sample.sorted_ids[:k], torch.from_numpy(llm_npz[f"{prefix}_nucleus_cand_ids"][0, :k]))
    assert int(sample.nucleus_pick) == llm_npz[f"{prefix}_nucleus_pick"][0]
    assert sample.token_id == llm_npz[f"{prefix}_tokens"][0]


def test_batched_decode_rows_at_different_positions(lm, llm_npz, frontend_npz):
    """Two streams prefilled into their own cache rows, then decoded in ONE forward, each at its own
    position, give the same log-probs as decoding them alone."""
    forced = torch.from_numpy(llm_npz["forced_tokens"])
    inputs = [lm_input_for(lm, frontend_npz, mode) for mode in ("zero_shot", "cross_lingual")]
    alone = [lm.speech_logp(forced_hidden(lm, x, forced[:2])[1:]) for x in inputs]
    lengths = [x.shape[1] for x in inputs]
    lm.setup_cache(2, max(lengths) + 2)
    with torch.inference_mode():
        for row, x in enumerate(inputs):
            lm(x, torch.arange(lengths[row])[None], row, lengths[row])
        positions = torch.tensor(lengths)[:, None]
        batched = []
        for i in range(2):
            x = lm.speech_embedding(forced[i].expand(2, 1))
            batched.append(lm.speech_logp(lm(x, positions + i, 0, max(lengths) + i + 1)[:, -1]))
    for row in range(2):
        torch.testing.assert_close(torch.stack([b[row] for b in batched]), alone[row], atol=1e-5, rtol=0)


def test_fixed_length_ignores_stop_tokens(lm, frontend_npz):
    lm_input = lm_input_for(lm, frontend_npz, "cross_lingual")
    tokens = list(generate(lm, lm_input, 0, 1, generator=torch.Generator().manual_seed(0), fixed_length=45))
    assert len(tokens) == 45
    assert all(0 <= t < lm.config.speech_token_size for t in tokens)


def test_stops_on_eos_after_min_len(cosyvoice2_golden, frontend_npz):
    """With the EOS logit made dominant, the loop masks it for min_len steps and then stops on it."""
    lm = CosyVoice2LM.from_pretrained(cosyvoice2_golden / "tiny")
    lm.llm_decoder.bias[lm.config.speech_token_size] += 100.0
    lm_input = lm_input_for(lm, frontend_npz, "cross_lingual")
    tokens = list(generate(lm, lm_input, min_len=3, max_len=40, generator=torch.Generator().manual_seed(0)))
    assert len(tokens) == 3
    assert all(t < lm.config.speech_token_size for t in tokens)


def test_max_len_bounds_generation(lm, frontend_npz):
    lm_input = lm_input_for(lm, frontend_npz, "cross_lingual")
    tokens = list(generate(lm, lm_input, min_len=7, max_len=7, generator=torch.Generator().manual_seed(0)))
    assert len(tokens) == 7


def test_mismatched_checkpoint_names_llm_pt(cosyvoice2_golden, tmp_path):
    config = CosyVoice2Config.from_model_dir(cosyvoice2_golden / "tiny")
    state = torch.load(cosyvoice2_golden / "tiny" / "llm.pt", map_location="cpu", weights_only=True)
    state["llm_decoder.weightz"] = state.pop("llm_decoder.weight")
    torch.save(state, tmp_path / "llm.pt")
    with pytest.raises(ModelFileError, match=r"llm\.pt.*llm_decoder\.weight"):
        CosyVoice2LM.from_pretrained(tmp_path, config)
