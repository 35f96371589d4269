"""The one JSONL reader of data/: every user file in that format goes through it, so errors read alike."""
from __future__ import annotations

import json
from pathlib import Path


def iter_jsonl(path: str | Path):
    """(line number, object) for every non-blank line; malformed JSON or a non-object line -> ValueError
    naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj
