"""The CosyVoice3 text tokenizer: CosyVoice2's Qwen2 BPE with upstream `CosyVoice3Tokenizer`'s specials.

The specials' ids follow from their order (151646.. in the release), so the list order is part of the model.
"""

from __future__ import annotations

from cosyapp.backends.cosyvoice2.tokenizer import COSYVOICE2_SPECIAL_TOKENS, CosyVoice2Tokenizer

_ARPABET_VOWELS = ("AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW")
_ARPABET_CONSONANTS = ("B", "CH", "D", "DH", "F", "G", "HH", "JH", "K", "L", "M", "N", "NG", "P", "R", "S", "SH",
                       "T", "TH", "V", "W", "Y", "Z", "ZH")
# ARPAbet phones in alphabetical order; vowels also with stress 0/1/2 right after the bare vowel.
ARPABET_TOKENS = tuple(
    f"[{phone}{stress}]"
    for phone in sorted(_ARPABET_VOWELS + _ARPABET_CONSONANTS)
    for stress in (("", "0", "1", "2") if phone in _ARPABET_VOWELS else ("",))
)
# Pinyin initials and toned finals, in upstream's order (Unicode code-point order of the bracketed strings).
PINYIN_TOKENS = tuple(f"[{p}]" for p in (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng ióng iù iú "
    "iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u uang ue un uo uà uài uàn "
    "uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn "
    "àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng "
    "āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
).split())
COSYVOICE3_SPECIAL_TOKENS = COSYVOICE2_SPECIAL_TOKENS + ("<|endofsystem|>",) + ARPABET_TOKENS + PINYIN_TOKENS


class CosyVoice3Tokenizer(CosyVoice2Tokenizer):
    """Text -> Qwen2 token ids, exactly as upstream `CosyVoice3Tokenizer.encode` (no BOS/EOS added)."""

    special_tokens = COSYVOICE3_SPECIAL_TOKENS
