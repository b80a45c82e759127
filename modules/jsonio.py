"""Reading JSON and JSONL input files with one-line errors, and writing output files atomically.

Every problem with an input file (missing, a folder, a byte that is not UTF-8, invalid JSON, a
wrong field) is a :class:`DataError` whose message is one line naming the file, the line and the
field, so a CLI can print it as is. Writers go through a temporary file and a rename, so a killed
run never leaves half a file. Imports neither torch nor transformers.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

# line_of(obj, key=None): the line of a decoded object, or of one of its keys (see read_json_with_lines).
LineOf = Callable[..., "int | None"]


class DataError(ValueError):
    """Bad input, reported as one line naming the file, the line and the field."""


def input_error(path: Path, line: int | None, fieldname: str | None, problem: str) -> DataError:
    """The one-line error ``<path>[:<line>]: [field '<fieldname>': ]<problem>``."""
    where = f"{path}:{line}" if line is not None else str(path)
    return DataError(f"{where}: field '{fieldname}': {problem}" if fieldname else f"{where}: {problem}")


def read_input_bytes(path: Path) -> bytes:
    """The bytes of an input file; a missing file or a folder in its place is a one-line DataError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None


def decode_utf8(path: Path, data: bytes, first_line: int = 1) -> str:
    """``data`` (the text of ``path`` from line ``first_line`` on) as UTF-8, a BOM at the start of
    the file dropped. A byte that is not UTF-8 is a DataError naming the file, line and column:
    the codec's own message names only a byte position."""
    bom = first_line == 1 and data.startswith(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + (len(codecs.BOM_UTF8) if bom else 0)  # utf-8-sig counts after the BOM
        line_start = data.rfind(b"\n", 0, offset) + 1 or (len(codecs.BOM_UTF8) if bom else 0)
        column = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
        raise input_error(path, first_line + data.count(b"\n", 0, offset), None,
                          f"byte 0x{data[offset]:02x} at column {column} is not UTF-8 (save the file as UTF-8; "
                          f"`python -m modules.convert csv` reads cp1252 and Latin-1 tables)") from None


def read_text_utf8(path: Path) -> str:
    """A whole UTF-8 file (a leading BOM dropped); a missing file or a byte that is not UTF-8 is a
    one-line DataError naming the file and line."""
    return decode_utf8(path, read_input_bytes(path))


def _load(path: Path, loads: Callable[[str], Any]) -> Any:
    """``loads`` of the file's text; invalid JSON is a one-line DataError naming the line."""
    try:
        return loads(read_text_utf8(path))
    except json.JSONDecodeError as err:
        raise input_error(path, err.lineno, None, f"invalid JSON ({err.msg})") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from a UTF-8 file (run configs, manifests, baselines); any problem with it is a
    one-line DataError naming the file (and the line)."""
    path = Path(path)
    obj = _load(path, json.loads)
    if not isinstance(obj, dict):
        raise input_error(path, None, None, "expected a JSON object")
    return obj


def read_json_with_lines(path: str | Path) -> tuple[dict, LineOf]:
    """:func:`read_json` for a file whose fields are checked one by one (dataset.json): also returns
    ``line_of`` (see :func:`loads_with_lines`), so an error can name the line of a bad field."""
    path = Path(path)
    obj, line_of = _load(path, loads_with_lines)
    if not isinstance(obj, dict):
        raise input_error(path, 1, None, "expected a JSON object")
    return obj, line_of


def loads_with_lines(text: str) -> tuple[Any, LineOf]:
    """``json.loads`` that also returns ``line_of(obj, key=None)``: the line where a decoded object
    (a dict of the result) starts, or where its ``key`` is written; None for anything else.

    The pure-Python scanner is used because the C one does not report where objects start; the
    files read this way (dataset.json) are small.
    """
    spans: dict[int, tuple[int, int]] = {}
    decoder = json.JSONDecoder()

    def parse_object(s_and_end, *args):
        obj, end = json.decoder.JSONObject(s_and_end, *args)
        spans[id(obj)] = (s_and_end[1] - 1, end)
        return obj, end

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    obj = decoder.decode(text)

    def line_of(item: Any, key: str | None = None) -> int | None:
        span = spans.get(id(item))
        if span is None:
            return None
        start, end = span
        if key is not None:
            # The key at this object's own level: skip matches inside nested objects.
            inner = [spans[id(v)] for v in item.values() if id(v) in spans]
            inner += [spans[id(x)] for v in item.values() if isinstance(v, list) for x in v if id(x) in spans]
            for match in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text[start:end]):
                pos = start + match.start()
                if not any(lo <= pos < hi for lo, hi in inner):
                    start = pos
                    break
        return text.count("\n", 0, start) + 1

    return obj, line_of


def iter_jsonl(path: Path, data: bytes | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, decoded value)`` for each non-blank line of a JSONL file (or of ``data``, its
    bytes as the caller already read them); a line that is not UTF-8 or not JSON is a one-line
    DataError naming the file and line."""
    if data is None:
        data = read_input_bytes(path)
    # Bytes, decoded line by line: a byte that is not UTF-8 is then reported with its line.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = decode_utf8(path, raw, first_line=lineno)
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise input_error(path, lineno, None, f"invalid JSON ({err.msg} at column {err.colno})") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 with "\\n" newlines through a temporary file and a rename, so a killed run
    never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    tmp.replace(path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON (UTF-8, unescaped), written atomically like write_text_atomic."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """One JSON object per line (UTF-8, unescaped), written atomically like write_text_atomic."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
