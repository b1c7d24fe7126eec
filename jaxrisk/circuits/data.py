"""Circuit data: a JSONL file of behaviour rows and clean text, tokenised, with file:line errors."""

from __future__ import annotations

from pathlib import Path

from jaxrisk.data.text import jsonl_rows, text_field
from jaxrisk.errors import InputError


def load_circuit_data(path: str | Path, tokenizer) -> dict:
    """{'behaviour': [(prompt ids, completion ids, compliance ids or None)], 'clean': [ids]}."""
    path = Path(path)
    behaviour, clean = [], []
    for n, row in jsonl_rows(path, "{prompt, completion} (the behaviour) or {text} (clean text)"):
        if "prompt" in row and "completion" in row:
            p = tokenizer(text_field(path, n, row, "prompt"))["input_ids"]
            c = tokenizer(text_field(path, n, row, "completion"), add_special_tokens=False)["input_ids"]
            alt = (tokenizer(text_field(path, n, row, "compliance"), add_special_tokens=False)["input_ids"]
                   if "compliance" in row else None)
            if not c or alt == []:
                raise InputError(f"{path}:{n}: empty {'completion' if not c else 'compliance'}")
            behaviour.append((p, c, alt))
        elif "text" in row:
            clean.append(tokenizer(text_field(path, n, row, "text"))["input_ids"])
        else:
            raise InputError(f"{path}:{n}: expected {{prompt, completion}} (the behaviour) or {{text}} (clean text)")
    if len(behaviour) < 5 or len(clean) < 5:
        raise InputError(f"{path}: need at least 5 behaviour rows and 5 clean rows "
                         f"(found {len(behaviour)} and {len(clean)})")
    return {"behaviour": behaviour, "clean": clean}
