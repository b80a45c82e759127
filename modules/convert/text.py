"""Decoding and cleaning corpus text (used by ``pipeline.py`` on every table and essay).

Encodings: the bytes are decoded as UTF-8 (a BOM is allowed); failing that as cp1252; failing
that (cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined) as Latin-1.

Mojibake is repaired with ftfy, one suspect run at a time: each run that ftfy's
``UTF8_DETECTOR_RE`` finds and ``is_bad`` confirms ("â€™", "â€\\x9d", "Â½": UTF-8 read as
cp1252/Latin-1) goes through ``ftfy.fix_encoding`` and becomes the characters it encodes
("’", "”", "½"): the steps of ftfy's own ``decode_inconsistent_utf8``, plus a count. Not
``ftfy.fix_text`` on the whole essay: once one run is mojibake it re-decodes the whole line,
so a word real text writes as "CAFÉ’s" (É and ’ are also the cp1252 reading of the UTF-8 for
"ɒ") would become "CAFɒs"; its other fixes (uncurled quotes, HTML entities, ...) would change
text that is not broken. ASAP's own file holds such runs (its essays went through UTF-8 and were
then read as cp1252); without the repair the closing quote "â€\\x9d" would lose its C1 byte and
leave "â€".

C1 control characters (U+0080-U+009F, what Latin-1 makes of bytes 0x80-0x9F) are then mapped
by ``ftfy.fixes.fix_c1_controls`` to the character cp1252 gives their byte (U+0092 -> right
single quote); the five that cp1252 leaves undefined have no such character and are dropped, so
the output never holds a C1 control character. Text is NFC-normalised and line endings become
"\\n" (the pipeline strips essays).
"""
from __future__ import annotations

import re

import ftfy
from ftfy.badness import is_bad
from ftfy.chardata import UTF8_DETECTOR_RE
from ftfy.fixes import fix_c1_controls

from modules.data import nfc

_C1_RE = re.compile("[\u0080-\u009f]")


def clean_text(text: str, repair_mojibake: bool = True) -> tuple[str, dict[str, int]]:
    """Repair mojibake, map or drop C1 control characters, NFC-normalise, "\\n" line endings.

    Returns the text and counts: ``mojibake_repaired`` (characters recovered from mojibake
    runs, one per UTF-8 sequence), ``c1_mapped`` and ``c1_dropped``.
    """
    counts = {"mojibake_repaired": 0, "c1_mapped": 0, "c1_dropped": 0}

    def fix(match: re.Match) -> str:
        run = match.group(0)
        fixed = ftfy.fix_encoding(run) if is_bad(run) else run
        if fixed != run:
            counts["mojibake_repaired"] += len(fixed)
        return fixed

    if repair_mojibake:
        text = UTF8_DETECTOR_RE.sub(fix, text)
    n_c1 = len(_C1_RE.findall(text))
    text = fix_c1_controls(text)
    counts["c1_dropped"] = len(_C1_RE.findall(text))
    counts["c1_mapped"] = n_c1 - counts["c1_dropped"]
    text = _C1_RE.sub("", text)
    return nfc(text.replace("\r\n", "\n").replace("\r", "\n")), counts


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Decode as UTF-8, else cp1252, else Latin-1; returns the text and the encoding used."""
    for encoding, name in (("utf-8-sig", "utf-8"), ("cp1252", "cp1252")):
        try:
            return data.decode(encoding), name
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"
