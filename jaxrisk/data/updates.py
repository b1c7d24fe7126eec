"""Update sets: the data a user is about to fine-tune on, as (prompt, response) text pairs.

JSONL rows `{"text": ...}` (plain text: the loss covers all of it), or Alpaca rows
`{"instruction", "input" (optional), "output"}` as JSONL or as one JSON array
(the loss covers the response only, as in supervised fine-tuning). Alpaca rows
are rendered with a prompt template whose placeholders are `{instruction}` and
`{input}`; the default is Stanford Alpaca's. Every problem names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jaxrisk.data.text import jsonl_rows, read_text, regular_file
from jaxrisk.errors import InputError

ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_TEMPLATE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                         "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

_EXPECTED = "{text} or Alpaca {instruction, input, output}"


@dataclass(frozen=True)
class UpdateExample:
    prompt: str     # not trained on ("" for plain text rows)
    response: str   # the trained-on text
    line: int       # where it came from (the array index + 1 for a JSON array)


def _json_array(path: Path) -> list[tuple[int, dict]]:
    try:
        value = json.loads(read_text(path))
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: not JSON ({getattr(e, 'msg', e)}); expected an array of Alpaca rows "
                         "(or use .jsonl: one object per line)") from None
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a JSON array of Alpaca rows {{instruction, input, output}}, "
                         f"got {type(value).__name__}")
    for n, row in enumerate(value, 1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: item {n} is {type(row).__name__}, expected an object with {_EXPECTED}")
    return list(enumerate(value, 1))


def _text(path: Path, where: str, row: dict, key: str, allow_empty: bool = False) -> str:
    value = row.get(key, "")
    if not isinstance(value, str):
        raise InputError(f"{path}:{where}: field {key!r} must be text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InputError(f"{path}:{where}: empty {key!r}")
    return value


def load_update_set(path: str | Path, template: str = ALPACA_TEMPLATE,
                    template_with_input: str = ALPACA_TEMPLATE_INPUT) -> list[UpdateExample]:
    """Read an update set (.jsonl, or .json holding an Alpaca array); InputError names the file and line."""
    path = regular_file(path, "an update set (.jsonl or .json)")
    if path.suffix == ".json":
        rows, where = _json_array(path), "item {}"
    elif path.suffix == ".jsonl":
        rows, where = jsonl_rows(path, _EXPECTED), "{}"
    else:
        raise InputError(f"{path}: expected a .jsonl update set ({_EXPECTED}) or an Alpaca .json array")
    for name, t in (("template", template), ("template_with_input", template_with_input)):
        if "{instruction}" not in t:
            raise InputError(f"prompt {name} {t[:60]!r}...: has no {{instruction}} placeholder")
    out = []
    for n, row in rows:
        at = where.format(n)
        if "text" in row:
            out.append(UpdateExample("", _text(path, at, row, "text"), n))
        elif "instruction" in row and "output" in row:
            instruction, extra = _text(path, at, row, "instruction"), _text(path, at, row, "input", True)
            fmt = template_with_input if extra.strip() else template
            try:
                prompt = fmt.format(instruction=instruction, input=extra)
            except (KeyError, IndexError, ValueError) as e:
                raise InputError(f"prompt template: {e!r}; it may only use {{instruction}} and {{input}} "
                                 "(write other braces as {{ and }})") from None
            out.append(UpdateExample(prompt, _text(path, at, row, "output"), n))
        else:
            raise InputError(f"{path}:{at}: expected {_EXPECTED}; found fields {sorted(row)}")
    if not out:
        raise InputError(f"{path}: no rows (the update set is empty)")
    return out
