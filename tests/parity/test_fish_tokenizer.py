"""Fish S1 tokenizer ids and prompt grids against the golden set (golden README 6.1; all exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyapp.backends.fish.prompt import Reference, build_prompt, prompt_parts
from cosyapp.backends.fish.tokenizer import FishTokenizer


@pytest.fixture(scope="module")
def tokenizer(fish_golden) -> FishTokenizer:
    return FishTokenizer.from_model_dir(fish_golden / "tiny")


def test_vocabulary_constants(tokenizer, fish_goldens_json):
    g = fish_goldens_json
    assert tokenizer.n_ranks == g["n_bpe_ranks"]
    for token, token_id in g["special_token_ids"].items():
        assert tokenizer.special_ids[token] == token_id, token
    assert tokenizer.semantic_begin_id == g["semantic_begin_id"]
    assert tokenizer.semantic_end_id == g["semantic_end_id"]
    assert tokenizer.im_end_id == g["im_end_id"]
    assert tokenizer.interleave_id == g["interleave_id"]
    assert tokenizer.semantic_end_id - tokenizer.semantic_begin_id + 1 == g["codebook_size"]


def test_token_ids_of_every_test_string(tokenizer, fish_goldens_json, fish_npz):
    data = fish_npz("tokenizer")
    flat, offsets = data["text_ids_flat"], data["text_ids_offsets"]
    texts = fish_goldens_json["tokenizer_texts"]
    assert len(offsets) == len(texts) + 1
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        assert ids == flat[offsets[i]:offsets[i + 1]].tolist(), text
        assert ids == fish_goldens_json["tokenizer_ids"][i], text
        assert tokenizer.decode(ids) == fish_goldens_json["tokenizer_decoded"][i], text


def test_token_pieces(tokenizer, fish_goldens_json):
    """Per id: the special token's string, or the hex of the BPE token's bytes."""
    specials = {token_id: token for token, token_id in tokenizer.special_ids.items()}
    for ids, pieces in zip(fish_goldens_json["tokenizer_ids"], fish_goldens_json["tokenizer_pieces"]):
        ours = [specials[i] if i in specials else tokenizer.token_bytes(i).hex() for i in ids]
        assert ours == pieces


def test_prompt_parts_tokenised_separately(tokenizer, fish_goldens_json, fish_npz):
    g = fish_goldens_json
    ref = Reference(torch.from_numpy(fish_npz("tokenizer")["ref_codes"]), g["reference_text"])
    for parts_key, text, refs in (("prompt_noref_parts", g["text_a"], []), ("prompt_ref_parts", g["text_b"], [ref])):
        ours = prompt_parts(text, refs)
        assert len(ours) == len(g[parts_key])
        for part, golden in zip(ours, g[parts_key]):
            if golden["type"] == "text":
                assert part == golden["text"]
                assert tokenizer.encode(part) == golden["ids"]
            else:
                assert part.shape[1] == golden["n_frames"]


def test_prompt_grids(tokenizer, fish_goldens_json, fish_npz):
    g, data, e2e = fish_goldens_json, fish_npz("tokenizer"), fish_npz("end_to_end")
    ref = Reference(torch.from_numpy(data["ref_codes"]), g["reference_text"])
    noref = build_prompt(tokenizer, g["text_a"], [], g["num_codebooks"])
    with_ref = build_prompt(tokenizer, g["text_b"], [ref], g["num_codebooks"])
    np.testing.assert_array_equal(noref.numpy(), data["prompt_noref"])
    np.testing.assert_array_equal(with_ref.numpy(), data["prompt_ref"])
    np.testing.assert_array_equal(noref.numpy(), e2e["e1_prompt"])
    np.testing.assert_array_equal(build_prompt(tokenizer, g["text_e2"], [ref], g["num_codebooks"]).numpy(),
                                  e2e["e2_prompt"])
    start, end = g["prompt_ref_semantic_span"]
    outside = torch.cat([with_ref[0, :start], with_ref[0, end:]]).tolist()
    assert tokenizer.decode(outside) == g["prompt_ref_text_outside_span"]
    assert tokenizer.decode(noref[0].tolist()) == g["prompt_noref_text"]
