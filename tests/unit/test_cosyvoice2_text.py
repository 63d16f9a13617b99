"""CosyVoice2 text normalisation edge cases (upstream `text_normalize` without a TN engine).

The golden strings are checked in tests/parity/test_cosyvoice2_frontend.py; here the rules are pinned one by
one with a word-count "tokenizer" so that the expected splits can be worked out by hand.
"""

from __future__ import annotations

import pytest

from cosyapp.backends.cosyvoice2.text import (contains_chinese, is_only_punctuation, normalize_sentences,
                                              normalize_whole, replace_blank, spell_out_number, split_paragraph)


def word_count(text: str) -> int:
    return len(text.split())


def one_piece_per_sentence(text: str) -> int:
    """A length under which every punctuation-delimited piece becomes its own sentence."""
    return 1000 if text else 0


def test_empty_and_blank_text() -> None:
    assert normalize_sentences("", word_count) == [""]  # upstream returns it untouched
    assert normalize_whole("", word_count) == ""
    assert normalize_sentences("  \n\t ", word_count) == []


def test_punctuation_only_sentences_are_dropped() -> None:
    assert normalize_sentences("……", word_count) == []
    assert normalize_sentences("!!!", word_count) == []
    assert normalize_whole("?!", word_count) == ""
    assert is_only_punctuation("。，！") and is_only_punctuation("$%") and not is_only_punctuation(" .")


def test_tagged_text_skips_normalisation() -> None:
    text = "You are 2 happy. 请开心地说 - 好<|endofprompt|>"
    assert normalize_sentences(text, word_count) == [text]
    assert normalize_whole(text, word_count) == text


def test_english_numbers_and_final_period() -> None:
    assert normalize_sentences("I have 3 cats and 24 dogs", word_count) == ["I have three cats and twenty-four dogs."]
    assert normalize_whole("  Room 101 ", word_count) == "Room one hundred and one."
    assert spell_out_number("year 2024!") == "year two thousand and twenty-four!"


def test_huge_numbers_are_read_digit_by_digit() -> None:
    assert spell_out_number("1" * 40) == " ".join(["one"] * 40)


def test_chinese_rules() -> None:
    assert contains_chinese("abc 中") and not contains_chinese("abc")
    # replace_blank keeps a space only between two ASCII characters, before " - " becomes "，".
    assert replace_blank("你好 world 世界 a b") == "你好world世界a b"
    assert normalize_sentences("A - B是².", word_count) == ["A，B是平方。"]
    assert normalize_sentences("（你好）【世界】`代码`——结束,,、", word_count) == [
        "你好世界代码 结束。"]
    assert normalize_sentences("第一行\n第二行", word_count) == ["第一行第二行。"]
    assert normalize_sentences("今天是2024年", word_count) == ["今天是2024年。"]  # no zh digit reading offline


def test_closing_quotes_stay_with_their_sentence() -> None:
    assert split_paragraph('He said "Stop." Then he left.', "en", one_piece_per_sentence) == [
        'He said "Stop."', " Then he left."]
    assert split_paragraph("他说：“走。”然后离开了。", "zh", one_piece_per_sentence) == [
        "他说：", "“走。”", "然后离开了。"]


def test_long_english_paragraph_splitting() -> None:
    piece = " ".join(["word"] * 9) + " end."  # 10 "tokens"
    # 12 pieces: a sentence closes before the piece that would pass 80 once it holds more than 60.
    sentences = normalize_sentences(" ".join([piece] * 12), word_count)
    assert [word_count(s) for s in sentences] == [80, 40]
    assert sentences[1].startswith(" word")  # pieces keep the blank after the previous period
    # 9 pieces: the 10-token remainder is shorter than 20 and joins the previous sentence.
    assert [word_count(s) for s in normalize_sentences(" ".join([piece] * 9), word_count)] == [90]


def test_long_chinese_paragraph_splitting_counts_characters() -> None:
    piece = "一二三四五六七八九十一二三四。"  # 15 characters
    assert [len(s) for s in normalize_sentences(piece * 8, word_count)] == [75, 45]
    assert [len(s) for s in normalize_sentences(piece * 6, word_count)] == [90]
    # Commas do not split Chinese sentences.
    assert normalize_sentences("你好，世界，再见", word_count) == ["你好，世界，再见。"]


def test_fst_normaliser_runs_first() -> None:
    class Doubler:
        def normalize(self, text: str) -> str:
            return text.replace("1", "11")

    assert normalize_sentences("1 cat", word_count, Doubler()) == ["eleven cat."]
    assert normalize_sentences("第1个", word_count, Doubler()) == ["第11个。"]


@pytest.mark.parametrize("text", ["Hello", "Hello.", "Hello!"])
def test_english_sentence_end(text: str) -> None:
    assert normalize_sentences(text, word_count) == [text if text[-1] in ".!" else text + "."]
