"""The CosyVoice2 text tokenizer: Qwen2 byte-level BPE from `CosyVoice-BlankEN`, plus CosyVoice2's specials.

Upstream loads the slow Qwen2 files with `AutoTokenizer`, which converts them to a fast tokenizer: NFC
normaliser, the Qwen2 regex split (isolated) then ByteLevel without prefix space, no BOS/EOS. We build the
same pipeline directly with the `tokenizers` library. Only `vocab.json`, `merges.txt` and
`tokenizer_config.json` are read; `model.safetensors` is never needed.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from cosyapp.backends.weights import read_json_file
from cosyapp.engine.types import ModelFileError

# The pre-tokenizer split used by every Qwen2 tokenizer.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added by upstream `CosyVoice2Tokenizer`, in this order. `<|im_start|>`/`<|im_end|>` already exist in the
# base tokenizer and keep their ids; the others get the next free ids (151646.. in the release).
COSYVOICE2_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)


def _read_vocab(path: Path, specials: dict[str, int]) -> dict[str, int]:
    """The BPE vocabulary. Besides the regular tokens (ids 0..n-1) it may list specials of `specials` (token ->
    id) at their own ids, anywhere above: that is how a small test vocabulary keeps the release's special ids."""
    vocab = read_json_file(path)
    if not isinstance(vocab, dict) or not vocab or not all(isinstance(v, int) for v in vocab.values()):
        raise ModelFileError(f"{path}: expected a non-empty JSON object mapping tokens to integer ids")
    regular = sorted(token_id for token, token_id in vocab.items() if specials.get(token) != token_id)
    if regular != list(range(len(regular))):
        raise ModelFileError(f"{path}: token ids are not 0..{len(regular) - 1} without gaps")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    if not path.is_file():
        raise ModelFileError(f"{path}: missing (tokenizer file of CosyVoice-BlankEN)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from exc
    merges = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
            raise ModelFileError(f"{path}: line {number} is not a merge of two vocab.json tokens: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_added_tokens(path: Path) -> list[tuple[int, AddedToken]]:
    """The specials of `tokenizer_config.json` (`added_tokens_decoder`), sorted by id."""
    config = read_json_file(path)
    entries = config.get("added_tokens_decoder", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ModelFileError(f"{path}: expected an object with an `added_tokens_decoder` mapping")
    added = []
    try:
        for token_id, entry in entries.items():
            added.append((int(token_id), AddedToken(
                entry["content"],
                single_word=bool(entry.get("single_word", False)),
                lstrip=bool(entry.get("lstrip", False)),
                rstrip=bool(entry.get("rstrip", False)),
                normalized=bool(entry.get("normalized", False)),
                special=bool(entry.get("special", True)),
            )))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: malformed `added_tokens_decoder` entry ({exc!r})") from exc
    return sorted(added, key=lambda pair: pair[0])


class CosyVoice2Tokenizer:
    """Text -> Qwen2 token ids, exactly as upstream `CosyVoice2Tokenizer.encode` (no BOS/EOS added)."""

    special_tokens: tuple[str, ...] = COSYVOICE2_SPECIAL_TOKENS  # added in this order after the config's

    def __init__(self, blank_en_dir: str | Path) -> None:
        blank_en_dir = Path(blank_en_dir)
        config_added = _read_added_tokens(blank_en_dir / "tokenizer_config.json")
        vocab = _read_vocab(blank_en_dir / "vocab.json", {token.content: token_id for token_id, token in config_added})
        merges = _read_merges(blank_en_dir / "merges.txt", vocab)

        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        # The config's specials must land on the ids it names: they follow the BPE vocab contiguously in
        # every released Qwen2 tokenizer, so adding them in id order reproduces them.
        for token_id, token in config_added:
            tokenizer.add_special_tokens([token])
            if tokenizer.token_to_id(token.content) != token_id:
                raise ModelFileError(
                    f"{blank_en_dir / 'tokenizer_config.json'}: added token {token.content!r} wants id {token_id}, "
                    f"which neither follows the {len(vocab)} tokens of vocab.json nor is listed there"
                )
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in self.special_tokens])
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (151663 for the release)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the CosyVoice2 vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        """Number of tokens of `text` (what the English sentence splitter measures)."""
        return len(self.encode(text))
