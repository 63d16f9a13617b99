"""How the Fish live socket (and the Wyoming server) cut streamed text into the segments it speaks (`TextSegmenter`)."""

from __future__ import annotations

from cosyapp.server.text_segments import TextSegmenter


def feed(segmenter: TextSegmenter, pieces: list[str]) -> list[str]:
    return [segment for piece in pieces for segment in segmenter.add(piece)]


def test_a_sentence_is_spoken_once_it_ends_and_is_long_enough() -> None:
    segmenter = TextSegmenter(min_chars=10, max_chars=100)
    # "Hi. " is a sentence but too short alone; the next sentence end completes a long enough segment.
    assert feed(segmenter, ["Hi. ", "How are", " you today? ", "Fine"]) == ["Hi. How are you today?"]
    assert segmenter.flush() == ["Fine"]
    assert segmenter.flush() == []


def test_an_ascii_full_stop_ends_a_sentence_only_before_white_space() -> None:
    segmenter = TextSegmenter(min_chars=0, max_chars=100)
    # "3." could go on as "3.14" and "e.g." sits mid-sentence; the text event may end right after the stop.
    assert feed(segmenter, ["Pi is 3.", "14 exactly.", " Next"]) == ["Pi is 3.14 exactly."]
    assert segmenter.flush() == ["Next"]


def test_cjk_sentence_ends_need_no_space_and_closing_quotes_stay() -> None:
    segmenter = TextSegmenter(min_chars=0, max_chars=100)
    assert feed(segmenter, ["他说：“你好。”今天", "天气真好！明天"]) == ["他说：“你好。”", "今天天气真好！"]
    assert segmenter.flush() == ["明天"]


def test_text_without_sentence_ends_is_cut_at_a_break_before_the_limit() -> None:
    segmenter = TextSegmenter(min_chars=5, max_chars=20)
    # What is left (20 characters) may still end in a sentence: it waits for more text.
    assert feed(segmenter, ["one two three four five six seven eight"]) == ["one two three four"]
    assert feed(segmenter, [" nine"]) == ["five six seven eight"]
    assert segmenter.flush() == ["nine"]


def test_a_flush_of_a_long_buffer_keeps_segments_within_the_limit() -> None:
    segmenter = TextSegmenter(min_chars=50, max_chars=10)
    segmenter.buffer = "x" * 25
    assert segmenter.flush() == ["x" * 10, "x" * 10, "x" * 5]
