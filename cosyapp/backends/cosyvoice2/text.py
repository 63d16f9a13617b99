"""CosyVoice2 text normalisation and sentence splitting (upstream `CosyVoiceFrontEnd.text_normalize`).

Upstream picks one of three engines: `ttsfrd` (not public), `wetext` (FST text normalisation, which
downloads its FSTs on first use) or nothing. Without the first two it runs the "offline" path, which is
what we reproduce by default and what the golden model inputs were made with:

- Chinese (any CJK ideograph): drop newlines, keep only blanks between two ASCII characters, spell
  out the corner marks, `.` -> `。`, ` - ` -> `，`, remove brackets and backticks, `——` -> space, a
  trailing run of commas -> `。`, then split into sentences counting characters.
- Anything else: spell out digit runs with inflect (`24` -> `twenty-four`), then split into sentences
  counting BPE tokens.
- Sentences that are only punctuation/symbols are dropped. Texts holding a `<|...|>` tag are left
  untouched (and unsplit), as is the empty text.

An FST normaliser (anything with `normalize(str) -> str`, e.g. `WetextNormalizer`) can be passed in; it
then runs first, exactly where upstream runs its wetext models. Upstream's wetext downloads its FSTs
from ModelScope (`pengzhendong/wetext`) at start-up; `WetextNormalizer` instead reads FST files from disk:
either that snapshot's layout or the TN FSTs shipped inside the PyPI wheel `WeTextProcessing`
(`tn/{zh,en}_tn_{tagger,verbalizer}.fst`; `pip install --no-deps wetextprocessing`: only its FST files are
used, so pynini is not needed). It needs the optional packages `wetext` and `kaldifst`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from pathlib import Path
from typing import Callable, Protocol

import inflect
import regex

CHINESE_CHAR = re.compile(r"[\u4e00-\u9fff]+")
ONLY_PUNCTUATION = regex.compile(r"^[\p{P}\p{S}]*$")
TRAILING_COMMAS = re.compile(r"[，,、]+$")

ZH_SENTENCE_END = frozenset("。？！；：、.?!;")
EN_SENTENCE_END = frozenset(".?!;:")
CLOSING_QUOTES = frozenset('"”')

# split_paragraph limits (upstream's defaults for CosyVoice2): lengths in characters (zh) or BPE tokens (en).
SENTENCE_MAX_LEN = 80
SENTENCE_MIN_LEN = 60
MERGE_LEN = 20


class FstNormalizer(Protocol):
    def normalize(self, text: str) -> str: ...


class WetextNormalizer:
    """Upstream's wetext branch: `wetext.Normalizer` (kaldifst runtime) with one zh and one en TN model.

    The zh model runs on text holding a CJK ideograph, the en model on anything else (the same test the
    caller uses to pick the zh/en rules). wetext itself only rewrites text that contains a digit.
    """

    def __init__(self, fst_dir: str | Path | None = None) -> None:
        try:
            from wetext import Normalizer
        except ImportError as exc:
            raise RuntimeError(f"the wetext text frontend needs the `wetext` package ({exc})") from exc
        paths = find_wetext_fsts(fst_dir)
        if paths is None:
            where = fst_dir or "the installed WeTextProcessing package (pip install --no-deps wetextprocessing)"
            raise RuntimeError(f"no wetext TN FSTs found in {where}")
        self._models = {lang: Normalizer(tagger_path=str(tagger), verbalizer_path=str(verbalizer), lang=lang)
                        for lang, (tagger, verbalizer) in paths.items()}

    def normalize(self, text: str) -> str:
        model = self._models["zh" if contains_chinese(text) else "en"]
        # kaldifst makes no thread-safety promise: the engine calls this from its backend's core loop only.
        return model.normalize(text)


def find_wetext_fsts(fst_dir: str | Path | None = None) -> dict[str, tuple[Path, Path]] | None:
    """{lang: (tagger, verbalizer)} for zh and en TN, from `fst_dir` or the installed WeTextProcessing.

    Layouts: WeTextProcessing's `{lang}_tn_tagger.fst`/`{lang}_tn_verbalizer.fst`, or the ModelScope wetext
    snapshot's `{lang}/tn/tagger.fst`/`verbalizer.fst` (upstream's choice: verbalizer without erhua removal).
    """
    if fst_dir is None:
        # find_spec does not import `tn` (whose Python modules need pynini); we only want its folder.
        spec = importlib.util.find_spec("tn")
        if spec is None or not spec.submodule_search_locations:
            return None
        fst_dir = next(iter(spec.submodule_search_locations))
    fst_dir = Path(fst_dir)
    layouts = (
        lambda lang: (fst_dir / f"{lang}_tn_tagger.fst", fst_dir / f"{lang}_tn_verbalizer.fst"),
        lambda lang: (fst_dir / lang / "tn" / "tagger.fst", fst_dir / lang / "tn" / "verbalizer.fst"),
    )
    for layout in layouts:
        paths = {lang: layout(lang) for lang in ("zh", "en")}
        if all(p.is_file() for pair in paths.values() for p in pair):
            return paths
    return None


def contains_chinese(text: str) -> bool:
    return CHINESE_CHAR.search(text) is not None


def is_only_punctuation(text: str) -> bool:
    return ONLY_PUNCTUATION.fullmatch(text) is not None


def replace_blank(text: str) -> str:
    """Keep a space only when both neighbours are non-space ASCII (between Latin words in Chinese text)."""
    kept = []
    for i, char in enumerate(text):
        if char != " ":
            kept.append(char)
            continue
        # Upstream indexes text[i - 1] (wrapping at 0) and text[i + 1] (failing at the end); the text is
        # stripped first, so neither happens in practice. Treat a missing neighbour as "not ASCII".
        before = text[i - 1] if i > 0 else ""
        after = text[i + 1] if i + 1 < len(text) else ""
        if before.isascii() and before not in ("", " ") and after.isascii() and after not in ("", " "):
            kept.append(char)
    return "".join(kept)


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


INFLECT_DIGITS = 36


@functools.cache
def _inflect_engine() -> inflect.engine:
    return inflect.engine()


def _number_words(digits: str) -> str:
    engine = _inflect_engine()
    # inflect stops at ~36 digits (upstream then crashes), and past 4300 digits int() itself refuses the run: read
    # such a run digit by digit instead, without asking inflect.
    if len(digits) <= INFLECT_DIGITS:
        with contextlib.suppress(inflect.NumOutOfRangeError):
            return engine.number_to_words(digits)
    return " ".join(engine.number_to_words(d) for d in digits)


def spell_out_number(text: str) -> str:
    """Replace every run of digits by its English words (inflect, `and`/hyphen style: 2024 -> two thousand
    and twenty-four)."""
    # str.isdigit (not a regex \d) is what upstream tests, so a superscript like ² counts as a digit too
    # (inflect reads it as "zero"); kept for parity.
    out = []
    run_start = None
    for i, char in enumerate(text):
        if char.isdigit():
            if run_start is None:
                run_start = i
            continue
        if run_start is not None:
            out.append(_number_words(text[run_start:i]))
            run_start = None
        out.append(char)
    if run_start is not None:
        out.append(_number_words(text[run_start:]))
    return "".join(out)


def split_paragraph(text: str, lang: str, length: Callable[[str], int]) -> list[str]:
    """Cut `text` after sentence punctuation, then greedily pack the pieces into sentences.

    A sentence is closed before adding a piece when the result would exceed SENTENCE_MAX_LEN and it already
    holds more than SENTENCE_MIN_LEN; a final remainder shorter than MERGE_LEN joins the previous sentence.
    Pieces keep the whitespace that follows the previous punctuation, so later sentences can start with a
    space, as upstream's do.
    """
    if not text:
        return []
    ends = ZH_SENTENCE_END if lang == "zh" else EN_SENTENCE_END
    if text[-1] not in ends:
        text += "。" if lang == "zh" else "."

    pieces: list[str] = []
    start = 0
    for i, char in enumerate(text):
        if char not in ends:
            continue
        if i > start:
            pieces.append(text[start:i + 1])
        if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
            # The closing quote belongs to the sentence it ends. (Upstream attaches it to the last piece
            # even when this punctuation mark produced none, e.g. `..."`.)
            if pieces:
                pieces[-1] += text[i + 1]
            start = i + 2
        else:
            start = i + 1

    sentences: list[str] = []
    current = ""
    for piece in pieces:
        if length(current + piece) > SENTENCE_MAX_LEN and length(current) > SENTENCE_MIN_LEN:
            sentences.append(current)
            current = ""
        current += piece
    if current:
        if length(current) < MERGE_LEN and sentences:
            sentences[-1] += current
        else:
            sentences.append(current)
    return sentences


def _normalize_chinese(text: str, fst: FstNormalizer | None) -> str:
    if fst is not None:
        text = fst.normalize(text)
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = replace_corner_mark(text)
    text = text.replace(".", "。")
    text = text.replace(" - ", "，")
    text = remove_bracket(text)
    return TRAILING_COMMAS.sub("。", text)


def _normalize_english(text: str, fst: FstNormalizer | None) -> str:
    if fst is not None:
        text = fst.normalize(text)
    return spell_out_number(text)


def normalize_sentences(text: str, token_count: Callable[[str], int], fst: FstNormalizer | None = None) -> list[str]:
    """`text_normalize(text, split=True)`: the normalised sentences, each synthesised on its own.

    `token_count` measures English sentence lengths (the BPE tokenizer's token count). May return an empty
    list (a text made only of punctuation); a `<|...|>` text or the empty text comes back unchanged.
    """
    if ("<|" in text and "|>" in text) or text == "":
        return [text]
    text = text.strip()
    if not text:
        # Upstream crashes here (split_paragraph indexes text[-1]); whitespace holds no sentence.
        return []
    if contains_chinese(text):
        sentences = split_paragraph(_normalize_chinese(text, fst), "zh", len)
    else:
        sentences = split_paragraph(_normalize_english(text, fst), "en", token_count)
    return [s for s in sentences if not is_only_punctuation(s)]


def normalize_whole(text: str, token_count: Callable[[str], int], fst: FstNormalizer | None = None) -> str:
    """`text_normalize(text, split=False)`: the same normalisation, sentences joined back into one string
    (used for the zero-shot prompt transcript)."""
    if ("<|" in text and "|>" in text) or text == "":
        return text
    return "".join(normalize_sentences(text, token_count, fst))
