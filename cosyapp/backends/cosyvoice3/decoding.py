"""CosyVoice3's addition to CosyVoice2's decoding (cosyvoice2/decoding.py): `SilenceCap`, which cuts runs of
FSQ silence/breath tokens longer than MAX_SILENT_RUN before the flow (the LM still sees them)."""

from __future__ import annotations

from typing import Iterable, Iterator

from cosyapp.backends.cosyvoice3.config import MAX_SILENT_RUN, SILENT_TOKENS


class SilenceCap:
    """Upstream `CosyVoice3Model.llm_job`'s filter: a silent token is dropped when it would be the 6th or later
    of a run of consecutive silent tokens; any other token resets the run."""

    def __init__(self, silent_tokens: Iterable[int] = SILENT_TOKENS, max_run: int = MAX_SILENT_RUN) -> None:
        self.silent_tokens = frozenset(silent_tokens)
        self.max_run = max_run
        self.run = 0

    def keep(self, token: int) -> bool:
        if token not in self.silent_tokens:
            self.run = 0
            return True
        self.run += 1
        return self.run <= self.max_run

    def filter(self, tokens: Iterable[int]) -> Iterator[int]:
        return (token for token in tokens if self.keep(token))
