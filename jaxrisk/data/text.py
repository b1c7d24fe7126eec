"""Reading user text files: regular files only, UTF-8 with the byte offset of any bad byte, JSONL by line.

Every reader of a user's text file (behaviours, circuit data, probe data, results to resume) goes
through here, so each problem is reported the same way: the file, the line or byte, what was expected.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from pathlib import Path

from jaxrisk.errors import InputError


def regular_file(path: str | Path, expected: str = "a file") -> Path:
    """`path` if it is a regular file; a FIFO, device or directory is refused before anything opens it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory, expected {expected}")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file (a FIFO, socket or device), expected {expected}")
    return path


def read_text(path: str | Path) -> str:
    """The file decoded as UTF-8 (a BOM is dropped); a bad byte is reported with its offset."""
    path = regular_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = data[:at].count(b"\n") + 1
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}, line {line}); "
                         "save the file as UTF-8") from None


def _object(text: str, where: str, expected: str) -> dict:
    """`text` parsed as one JSON object; `where` (file or file:line) and `expected` name a failure."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where}: not a JSON object ({getattr(e, 'msg', e)}); expected {expected}") from None
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a JSON object with {expected}, got {type(value).__name__}")
    return value


def json_object(path: str | Path, expected: str) -> dict:
    """A file holding one JSON object (a config, an index)."""
    return _object(read_text(path), str(path), expected)


def jsonl_rows(path: str | Path, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; `expected` says what a row should hold.

    Lines end at \\n only (JSON strings may hold U+2028 and the like, which `str.splitlines` would split at)."""
    lines = read_text(path).split("\n")
    return [(n, _object(line, f"{path}:{n}", expected)) for n, line in enumerate(lines, 1) if line.strip()]


def text_field(path: Path, line: int, row: dict, key: str) -> str:
    """`row[key]` if it is a string, else an error naming the file, line and field."""
    value = row[key]
    if not isinstance(value, str):
        raise InputError(f"{path}:{line}: field {key!r} must be text, got {type(value).__name__}")
    return value
