"""The S1 tokenizer: tiktoken BPE over `tokenizer.tiktoken` plus the control/semantic tokens of
`special_tokens.json`.

S1 quirks kept on purpose (the goldens pin them):
* the pre-tokenizer pattern is Fish's own (single digits, lone punctuation, whole whitespace runs, and a
  `\\s+(\\?!\\S)` branch that is a literal `?!`, not a look-ahead);
* special-token ids are numbered sequentially from the number of BPE ranks in the JSON key order; the ids
  stored in the file are ignored;
* every special token is recognised inline in user text; `<|speaker:N|>` is not a special token;
* a rank line whose token field is `=` is skipped.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import tiktoken

from cosyapp.backends.fish.config import SPECIAL_TOKENS_FILE, TOKENIZER_FILE
from cosyapp.backends.weights import read_json_file
from cosyapp.engine.types import ModelFileError

FISH_PRETOKENIZE_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions
    r"\p{P}",  # any single punctuation character
    r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a run of letters with at most one leading non-letter
    r"\p{N}",  # one digit at a time
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # symbols
    r"\s*[\r\n]+",  # newlines
    r"\s+(\?!\S)",  # sic: an escaped '?' (literal "?!" + one character), not a negative look-ahead
    r"\s+",  # any other whitespace run, kept whole
])

IM_END = "<|im_end|>"
INTERLEAVE = "<|interleave|>"


def semantic_token(code: int) -> str:
    return f"<|semantic:{code}|>"


def read_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise ModelFileError(f"{path}: missing")
    ranks: dict[bytes, int] = {}
    try:
        for line_no, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            if token == "=":
                continue
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: bad rank line ({exc})") from exc
    if not ranks:
        raise ModelFileError(f"{path}: no BPE ranks")
    return ranks


def read_special_tokens(path: Path) -> list[str]:
    raw = read_json_file(path)
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ModelFileError(f"{path}: expected a JSON object token -> id")
    return list(raw)


class FishTokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: list[str], name: str = "fish") -> None:
        self.n_ranks = len(ranks)
        self.special_ids = {token: self.n_ranks + i for i, token in enumerate(special_tokens)}
        self._encoding = tiktoken.Encoding(name=name, pat_str=FISH_PRETOKENIZE_PATTERN, mergeable_ranks=ranks,
                                           special_tokens=self.special_ids)
        missing = [t for t in (IM_END, INTERLEAVE, semantic_token(0)) if t not in self.special_ids]
        if missing:
            raise ModelFileError(f"{SPECIAL_TOKENS_FILE}: missing special tokens {missing}")
        self.im_end_id = self.special_ids[IM_END]
        self.interleave_id = self.special_ids[INTERLEAVE]
        self.semantic_begin_id = self.special_ids[semantic_token(0)]
        n_semantic = 0
        while semantic_token(n_semantic) in self.special_ids:
            n_semantic += 1
        self.semantic_end_id = self.semantic_begin_id + n_semantic - 1
        if self.special_ids[semantic_token(n_semantic - 1)] != self.semantic_end_id:
            raise ModelFileError(f"{SPECIAL_TOKENS_FILE}: semantic tokens are not contiguous")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> FishTokenizer:
        model_dir = Path(model_dir)
        ranks = read_ranks(model_dir / TOKENIZER_FILE)
        return cls(ranks, read_special_tokens(model_dir / SPECIAL_TOKENS_FILE), name=model_dir.name or "fish")

    @property
    def vocab_size(self) -> int:
        """Ranks + special tokens (the model's embedding table may be padded beyond this)."""
        return self.n_ranks + len(self.special_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; every special token written in the text becomes its control id."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)
