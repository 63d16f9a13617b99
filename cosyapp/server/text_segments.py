"""Text that arrives in pieces (an LLM's answer as it is written) cut into the segments spoken one after another:
a segment ends at a sentence end once it holds at least `min_chars` characters, or at the last break (white space,
comma, colon) before `max_chars` characters when no sentence ends in time; `flush` cuts whatever is buffered.
Fish's live socket (routes/fish_live.py), the Wyoming server's streamed text (wyoming_tts.py) and the voice agent's
answers (agent/turn.py) speak in these segments."""

from __future__ import annotations

import re

# Sentence ends: CJK ones stand alone; ASCII ones count only before white space (not "3.14", not "e.g" mid-word,
# and not at the end of the buffer, where the next text event may go on with the same word). Closing quotes and
# brackets stay with their sentence.
SENTENCE_END = re.compile(r"(?:[。！？；…]+|[.!?;]+(?=\s))[\"'”’)）\]]*")
BREAK = re.compile(r"[\s,，、:：]")


class TextSegmenter:
    """Cuts streamed text into the segments spoken one after another (see the module docstring)."""

    def __init__(self, min_chars: int, max_chars: int) -> None:
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.buffer = ""

    def add(self, text: str) -> list[str]:
        """Buffer `text`; the segments now complete."""
        self.buffer += text
        segments = []
        while (cut := self._cut()) is not None:
            segments.append(self.buffer[:cut].strip())
            self.buffer = self.buffer[cut:]
        return [segment for segment in segments if segment]

    def flush(self) -> list[str]:
        """Everything buffered, as segments of at most max_chars characters."""
        segments = self.add("")
        while self.buffer.strip():
            cut = self._break_before_max() if len(self.buffer) > self.max_chars else len(self.buffer)
            segments.append(self.buffer[:cut].strip())
            self.buffer = self.buffer[cut:]
        self.buffer = ""
        return [segment for segment in segments if segment]

    def _cut(self) -> int | None:
        for end in SENTENCE_END.finditer(self.buffer):
            if end.end() > self.max_chars:
                break
            if len(self.buffer[:end.end()].strip()) >= self.min_chars:
                return end.end()
        if len(self.buffer) > self.max_chars:
            return self._break_before_max()
        return None

    def _break_before_max(self) -> int:
        breaks = [match.end() for match in BREAK.finditer(self.buffer, 0, self.max_chars + 1)]
        return breaks[-1] if breaks and breaks[-1] > self.max_chars // 2 else self.max_chars
