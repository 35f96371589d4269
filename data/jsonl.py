"""Reading users' text files, once for all of data/: the file check, UTF-8 decoding with the line of a bad
byte, and the one JSONL reader (ShapesWorld formats, the voice catalogue). Errors read alike everywhere:
`InputError("file:line: why")`."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from . import InputError


def existing_file(path: str | Path) -> Path:
    """`path` as a Path if it is a regular file; a missing path or a folder -> InputError."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return path


def _decode(path, raw: bytes, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         f"save the file as UTF-8") from None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of a UTF-8 text file, streamed; a leading BOM (Excel's
    "CSV UTF-8") is dropped. A byte that is not UTF-8 -> InputError naming its line and column."""
    path = existing_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield lineno, _decode(path, raw, lineno)


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file (BOM dropped), with text_lines' errors."""
    path = existing_file(path)
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                         f"{e.start - line_start + 1}); save the file as UTF-8") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; malformed JSON, a non-object line or a byte that
    is not UTF-8 -> InputError naming the file and line."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj
