"""Decoding and cleaning corpus text (used by ``pipeline.py`` on every table and essay).

Encodings: the bytes are decoded as UTF-8 (a BOM is allowed); failing that as cp1252; failing
that (cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined) as Latin-1. Latin-1 would turn bytes
0x80-0x9F into C1 control characters, so after decoding every remaining character U+0080-U+009F
is mapped to the character cp1252 gives its byte (U+0092 -> right single quote) and dropped where
cp1252 defines none (the five bytes above); the output never holds a C1 control character.
Before that, mojibake is repaired: a run of characters that are the cp1252/Latin-1 reading of one
well-formed UTF-8 multi-byte sequence ("â€™", "â€\\x9d", "Â½") is replaced by the character it
encodes ("’", "”", "½"); only sequences led by "Â", "Ã", "â" or "ð" (Latin-1 letters and symbols,
punctuation, emoji), since other lead characters are capitals like "É" that real text may put
before a curly quote. ASAP's own file holds such runs (its essays went through UTF-8 and were
then read as cp1252); without the repair the closing quote "â€\\x9d" would lose its C1 byte and
leave "â€". Text is NFC-normalised, line endings become "\\n" and essays are stripped.
"""
from __future__ import annotations

import re

from modules.data import nfc


def _byte_table() -> dict[int, str]:
    """Byte 0x80-0xFF -> character as cp1252 reads it, Latin-1 where cp1252 has none."""
    table = {}
    for b in range(0x80, 0x100):
        try:
            table[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            table[b] = chr(b)
    return table


_BYTE_CHAR = _byte_table()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}


def _char_class(lo: int, hi: int) -> str:
    return "[" + "".join(re.escape(_BYTE_CHAR[b]) for b in range(lo, hi + 1)) + "]"


_CONT = _char_class(0x80, 0xBF)
# One UTF-8 multi-byte sequence as cp1252/Latin-1 shows it: a lead byte and its continuation bytes.
# Only the lead bytes of Latin-1 symbols and letters (0xC2 "Â", 0xC3 "Ã"), of punctuation, symbols
# and the euro sign (0xE2 "â") and of emoji (0xF0 "ð"): other leads are capitals such as "É" that
# real text does put before a curly quote or an ellipsis ("CAFÉ’s"), which must stay as written.
_MOJIBAKE_RE = re.compile(f"[ÂÃ]{_CONT}|â{_CONT}{{2}}|ð{_CONT}{{3}}")
_C1_RE = re.compile("[\u0080-\u009f]")


def clean_text(text: str, repair_mojibake: bool = True) -> tuple[str, dict[str, int]]:
    """Repair mojibake, map or drop C1 control characters, NFC-normalise, "\\n" line endings.

    Returns the text and counts (``mojibake_repaired``, ``c1_mapped``, ``c1_dropped``).
    """
    counts = {"mojibake_repaired": 0, "c1_mapped": 0, "c1_dropped": 0}

    def fix(match: re.Match) -> str:
        try:
            out = bytes(_CHAR_BYTE[c] for c in match.group(0)).decode("utf-8")
        except UnicodeDecodeError:  # overlong or surrogate forms: leave the text as it is
            return match.group(0)
        counts["mojibake_repaired"] += 1
        return out

    def c1(match: re.Match) -> str:
        mapped = _BYTE_CHAR[ord(match.group(0))]
        if _C1_RE.fullmatch(mapped):
            counts["c1_dropped"] += 1
            return ""
        counts["c1_mapped"] += 1
        return mapped

    if repair_mojibake:
        text = _MOJIBAKE_RE.sub(fix, text)
    text = _C1_RE.sub(c1, text)
    return nfc(text.replace("\r\n", "\n").replace("\r", "\n")), counts


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Decode as UTF-8, else cp1252, else Latin-1; returns the text and the encoding used."""
    for encoding, name in (("utf-8-sig", "utf-8"), ("cp1252", "cp1252")):
        try:
            return data.decode(encoding), name
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"
