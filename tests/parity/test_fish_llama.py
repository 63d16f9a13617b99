"""Fish S1 dual-AR transformer and sampler against the golden set (README 6.2-6.4, 7).

Logits/hidden states 1e-4 abs, probabilities 1e-5 abs with the same nucleus, ids/frames/noise exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyapp.backends.fish.generate import (FrameGenerator, Sampler, SamplingParams, frame_budget, penalty_window,
                                            request_generator)

LOGIT_ATOL = 1e-4
PROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def model(fish_backend):
    return fish_backend.model


@pytest.fixture(scope="module")
def gen_params(fish_goldens_json) -> SamplingParams:
    p = fish_goldens_json["gen_params"]
    return SamplingParams(temperature=p["temperature"], top_p=p["top_p"], repetition_penalty=p["repetition_penalty"],
                          max_new_tokens=p["max_new_tokens"])


@pytest.mark.parametrize("name", ["noref", "ref"])
def test_full_pass_logits_and_hidden(model, fish_npz, name):
    prompt = torch.from_numpy(fish_npz("tokenizer")[f"prompt_{name}"])[None]
    golden = fish_npz("llama")
    with torch.inference_mode():
        logits, hidden = model(prompt)
    cols = golden[f"{name}_logits_cols"].shape[1]
    np.testing.assert_allclose(logits[0, :, :cols].numpy(), golden[f"{name}_logits_cols"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(logits[0, -1].numpy(), golden[f"{name}_logits_last"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(hidden[0].numpy(), golden[f"{name}_hidden"], rtol=0, atol=LOGIT_ATOL)


def test_fast_transformer_teacher_forced(model, fish_npz):
    golden = fish_npz("llama")
    hidden = torch.from_numpy(golden["fast_tf_hidden_in"])[None]
    codes = torch.from_numpy(golden["fast_tf_codes"])[None]
    np.testing.assert_allclose(hidden[0].numpy(), golden["ref_hidden"][-1], rtol=0, atol=LOGIT_ATOL)
    with torch.inference_mode():
        full = model.fast_forward(hidden, codes)[0]
        cached = [model.fast_forward_cached(hidden, 0)[0]]
        for k in range(1, codes.shape[1]):
            cached.append(model.fast_forward_cached(model.fast_embeddings(codes[:, k - 1]), k)[0])
    np.testing.assert_allclose(full.numpy(), golden["fast_tf_logits"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(torch.stack(cached).numpy(), golden["fast_tf_logits"], rtol=0, atol=LOGIT_ATOL)


def test_rng_stream_matches_upstream(fish_goldens_json):
    g = fish_goldens_json
    check = g["rng_check_after_manual_seed_gen"]
    generator = request_generator(g["gen_seed"], "cpu")
    main = torch.empty(g["vocab_size"]).exponential_(1, generator=generator)
    fast = torch.empty(g["codec"]["residual_codebook_size"]).exponential_(1, generator=generator)
    main_check, fast_check = check["exponential_vocab_size_first8"], check["then_exponential_1024_first4"]
    assert main[:len(main_check)].tolist() == main_check
    assert fast[:len(fast_check)].tolist() == fast_check


def test_seeded_generation_reproduces_upstream_frames(model, fish_npz, fish_goldens_json, gen_params):
    g = fish_goldens_json
    prompt = torch.from_numpy(fish_npz("tokenizer")["prompt_ref"])
    frames = FrameGenerator(model, gen_params, request_generator(g["gen_seed"], "cpu"))
    budget = frame_budget(prompt.shape[-1], gen_params.max_new_tokens, model.config.max_seq_len)
    out = torch.cat(list(frames.frames(prompt, budget, g["im_end_id"], check_every=3)), dim=1)
    np.testing.assert_array_equal(out.numpy(), fish_npz("llama")["gen_frames"])
    assert out.shape[1] == g["gen_n_frames"]
    assert (out[0] >= g["semantic_begin_id"]).tolist() == g["gen_main_token_is_semantic"]


def test_kv_cached_steps_teacher_forced(model, fish_npz, fish_goldens_json):
    """Prefill + one cached decode step per generated frame: slow logits/hidden and fast logits per step."""
    golden, g = fish_npz("llama"), fish_goldens_json
    prompt = torch.from_numpy(fish_npz("tokenizer")["prompt_ref"])[None]
    frames = torch.from_numpy(golden["gen_frames"])
    width = golden["gen_step_fast_logits"].shape[-1]
    step_logits, step_hidden, step_fast = [], [], []
    with torch.inference_mode():
        for i in range(frames.shape[1]):
            grid = prompt if i == 0 else frames[None, :, i - 1:i]
            logits, hidden = model.forward_cached(grid, 0 if i == 0 else prompt.shape[-1] + i - 1)
            model.fast_forward_cached(hidden, 0)
            fast = [model.fast_forward_cached(model.fast_embeddings(frames[k:k + 1, i]), k)[0, :width]
                    for k in range(1, g["num_codebooks"])]
            step_logits.append(logits[0])
            step_hidden.append(hidden[0])
            step_fast.append(torch.stack(fast))
    np.testing.assert_allclose(torch.stack(step_logits).numpy(), golden["gen_step_logits"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(torch.stack(step_hidden).numpy(), golden["gen_step_hidden"], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_allclose(torch.stack(step_fast).numpy(), golden["gen_step_fast_logits"], rtol=0,
                               atol=LOGIT_ATOL)


def _window_at_step(gen_frames: np.ndarray, i: int) -> torch.Tensor:
    """The penalty window when frame i is sampled: the generator's buffer (prefill frame in column 0, frame
    i' in column i') holds frames 0..i-1 at that point; later columns are still zero."""
    frames = torch.zeros(gen_frames.shape[0], max(gen_frames.shape[1], 17), dtype=torch.long)
    frames[:, :i] = torch.from_numpy(gen_frames[:, :i])
    return penalty_window(frames, i - 1)


def test_repetition_penalty_windows(model, fish_npz):
    """S1's window arithmetic incl. the column-0 quirk for the main token (README 6.4, 8.B.1), as the
    generator picks them with default parameters."""
    golden = fish_npz("llama")
    frames = FrameGenerator(model, SamplingParams(), torch.Generator())
    assert (golden["gen_main_rp_ids"][0] == -1).all() and (golden["gen_fast_rp_ids"][0] == -1).all()
    for i in range(1, golden["gen_frames"].shape[1]):
        window = _window_at_step(golden["gen_frames"], i)
        np.testing.assert_array_equal(frames.main_penalty_ids(window).numpy(), golden["gen_main_rp_ids"][i])
        np.testing.assert_array_equal(window[2:].numpy(), golden["gen_fast_rp_ids"][i])


def test_sampler_probabilities(fish_npz, fish_goldens_json, gen_params):
    golden = fish_npz("llama")
    sampler = Sampler(gen_params, "cpu", torch.Generator())
    for i in range(golden["gen_frames"].shape[1]):
        main_ids = None if i == 0 else torch.from_numpy(golden["gen_main_rp_ids"][i])
        probs = sampler.probs(torch.from_numpy(golden["gen_step_logits"][i]), main_ids).numpy()
        np.testing.assert_array_equal(probs > 0, golden["gen_main_probs"][i] > 0)
        np.testing.assert_allclose(probs, golden["gen_main_probs"][i], rtol=0, atol=PROB_ATOL)
        for k in range(fish_goldens_json["num_codebooks"] - 1):  # the residual codebooks
            ids = None if i == 0 else torch.from_numpy(golden["gen_fast_rp_ids"][i, k])
            probs = sampler.probs(torch.from_numpy(golden["gen_step_fast_logits"][i, k]), ids).numpy()
            np.testing.assert_array_equal(probs > 0, golden["gen_fast_probs"][i, k] > 0)
            np.testing.assert_allclose(probs, golden["gen_fast_probs"][i, k], rtol=0, atol=PROB_ATOL)


def test_sampler_scalars_are_float32(gen_params, fish_goldens_json):
    sampler = Sampler(gen_params, "cpu", torch.Generator())
    seen = [sampler.temperature.item(), sampler.top_p.item(), sampler.repetition_penalty.item()]
    assert seen == fish_goldens_json["gen_sampler_scalars_seen"][0]


def test_noise_draw_order_and_samples(fish_npz, fish_goldens_json, gen_params):
    """Per frame: Exp(1) over the vocabulary, then Exp(1) over the residual codebook for each residual codebook;
    sample = argmax(p / q)."""
    golden, g = fish_npz("llama"), fish_goldens_json
    generator = request_generator(g["gen_seed"], "cpu")
    sampler = Sampler(gen_params, "cpu", generator)
    for i in range(golden["gen_frames"].shape[1]):
        main_probs = torch.from_numpy(golden["gen_main_probs"][i])
        noise = torch.empty_like(main_probs).exponential_(1, generator=generator)
        support = golden["gen_main_probs"][i] > 0
        np.testing.assert_array_equal(noise.numpy()[support], golden["gen_main_noise"][i][support])
        assert int(torch.argmax(main_probs / noise)) == golden["gen_frames"][0, i]
        for k in range(g["num_codebooks"] - 1):
            fast_probs = torch.from_numpy(golden["gen_fast_probs"][i, k])
            noise = torch.empty_like(fast_probs).exponential_(1, generator=generator)
            support = golden["gen_fast_probs"][i, k] > 0
            np.testing.assert_array_equal(noise.numpy()[support], golden["gen_fast_noise"][i, k][support])
            assert int(torch.argmax(fast_probs / noise)) == golden["gen_frames"][k + 2, i]
    # The sampler's own draw consumes the stream the same way.
    generator.manual_seed(g["gen_seed"])
    assert int(sampler.draw(torch.from_numpy(golden["gen_main_probs"][0]))) == golden["gen_frames"][0, 0]


def test_main_history_penalty_switch_changes_what_readme_says(fish_npz, fish_goldens_json, gen_params):
    """The product fix (penalise the main-token history, window row 0) moves the main logits by the amount
    the README measured; the default stays on S1's quirk (pinned by the tests above)."""
    golden = fish_npz("llama")
    sampler = Sampler(gen_params, "cpu", torch.Generator())
    diff = 0.0
    for i in range(1, golden["gen_frames"].shape[1]):
        window = _window_at_step(golden["gen_frames"], i)
        logits = torch.from_numpy(golden["gen_step_logits"][i])
        history, quirk = sampler.penalize(logits, window[0]), sampler.penalize(logits, window[:, 0])
        diff = max(diff, float((history - quirk).abs().max()))
    assert diff == pytest.approx(fish_goldens_json["gen_main_penalty_row0_vs_quirk_max_logit_diff"], abs=1e-4)
    assert not SamplingParams().penalty_main_history
