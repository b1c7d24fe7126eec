"""The one safetensors reader: validates a file from a stranger exactly as the reference library does.

Weights files are untrusted input, so no byte is used before the whole header checks out. The rules
are those of the Rust `safetensors` crate (`SafeTensors::read_metadata`, `Metadata::validate` in
`safetensors/src/tensor.rs`) and of the serde_json parser it uses: the header length is bounded by the
file and by 100 MB; the header is a UTF-8 JSON object nested at most 127 deep, without NaN, lone
surrogates or numbers that overflow a double; `__metadata__` is optional (null or string -> string);
every tensor has a known dtype, a shape and `data_offsets` of unsigned 64-bit integers; sorted by
offset the tensors tile the data section from 0 to its very end, each exactly as long as its dtype and
shape say (computed without overflow). A file the library would load is loaded the same, bit for bit;
any other is refused with an `InputError` naming the file, the tensor and what was expected.

serde quirks followed for exactness: unknown fields of a tensor entry are ignored; an entry may also be a
`[dtype, shape, data_offsets]` array and a dtype a `{"F32": null}` object; a repeated tensor name or
metadata key keeps the last value (every copy must still be valid); a repeated field is an error.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxrisk.data.text import regular_file
from jaxrisk.errors import InputError

MAX_HEADER_BYTES = 100_000_000  # the library's MAX_HEADER_SIZE
_MAX_JSON_DEPTH = 127           # serde_json's recursion limit (128 levels, the first spent on the outer object)
_U64 = 2 ** 64                  # shapes and offsets are Rust usize; sizes must not overflow it

# every dtype the library knows, with its width in bits (F4 and F6 are packed below a byte)
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
# those numpy (with ml_dtypes) can hold as one element per item; the packed ones cannot
NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz), "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "F32": np.dtype(np.float32), "C64": np.dtype(np.complex64),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64)}
# dtypes a model's weights may have; they are converted to the compute dtype on load
WEIGHT_DTYPES = frozenset(NUMPY_DTYPES[name] for name in ("F32", "F64", "F16", "BF16"))

PICKLE_HINT = (
    "it looks like a PyTorch pickle checkpoint, which jaxrisk refuses to load: unpickling executes "
    "code chosen by the file's author. Convert it where you trust it, e.g. "
    "`from safetensors.torch import save_file; save_file(torch.load(p, weights_only=True), 'model.safetensors')`"
)
_FINITE_CHUNK = 1 << 22  # elements per NaN / inf check


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name as in the file (e.g. "BF16"), shape, [begin, end) in the data section."""
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


class _Object(list):
    """A JSON object kept as its (key, value) pairs, so repeated keys stay visible as they are to serde."""


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], int, dict[str, str] | None]:
    """(tensors by name, byte where the data section starts, `__metadata__` or None) of a validated file."""
    path = Path(path)
    with _map(path) as buffer:
        return _parse(path, buffer)


def open_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a validated file as a read-only numpy view of a memory map (bf16 via ml_dtypes).

    Nothing is copied; the map lives as long as any returned array. A dtype or shape that the library
    accepts but numpy cannot hold (packed F4/F6, a zero-size shape with a huge dimension) is an InputError.
    """
    path = Path(path)
    buffer = _map(path)
    tensors, data_start, _ = _parse(path, buffer)
    raw = np.frombuffer(buffer, np.uint8)
    out = {}
    for name, info in tensors.items():
        if info.dtype not in NUMPY_DTYPES:
            raise InputError(f"{_where(path, name)} has unsupported dtype {info.dtype} (packed below a byte, "
                             f"numpy cannot hold it); expected one of {', '.join(NUMPY_DTYPES)}")
        begin, end = info.data_offsets
        try:
            out[name] = raw[data_start + begin:data_start + end].view(NUMPY_DTYPES[info.dtype]).reshape(info.shape)
        except ValueError as e:  # numpy's own limits: at most 64 dimensions, sizes within int64 even when empty
            raise InputError(f"{_where(path, name)} has unsupported shape {_short(list(info.shape))} ({e})") from None
    return out


def check_finite(source: str, name: str, array: np.ndarray) -> None:
    """Refuse a weight tensor (of WEIGHT_DTYPES) with NaN or inf: a scan of such weights would look clean.

    Checked a chunk at a time, so a memory-mapped tensor is never copied whole.
    """
    flat = array.reshape(-1)
    bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + _FINITE_CHUNK])))
              for i in range(0, flat.size, _FINITE_CHUNK))
    if bad:
        raise InputError(f"{_where(source, name)} has {bad} NaN / inf values; "
                         "refusing to scan a model whose weights are not finite")


def _map(path: Path) -> mmap.mmap:
    """Memory-map a regular file read-only; anything else (missing, directory, FIFO, device) is refused unopened."""
    regular_file(path, "a .safetensors file")
    try:  # O_NONBLOCK: should the path have been swapped for a FIFO since the stat, opening it cannot hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise InputError(f"{path}: cannot open it ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file, expected a .safetensors file")
        if info.st_size < 8:
            head = os.read(fd, 8)
            raise _header_error(path, head, f"only {info.st_size} bytes, expected at least 8")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)


def _header_error(path: Path, head: bytes, reason: str) -> InputError:
    """The error for a file whose header does not parse: a pickle is named as such, and is never unpickled."""
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return InputError(f"{path}: {PICKLE_HINT}")
    return InputError(f"{path}: not a safetensors file ({reason})")


def _parse(path: Path, buffer) -> tuple[dict[str, TensorInfo], int, dict[str, str] | None]:
    """Validate the whole file in `buffer` (at least 8 bytes) as the library does."""
    size, head = len(buffer), bytes(buffer[:8])
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise _header_error(path, head, f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise _header_error(path, head, f"header length {n} runs past the end of the {size}-byte file; truncated?")
    try:
        text = bytes(buffer[8:8 + n]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _header_error(path, head, f"header is not UTF-8: {e.reason} at byte {8 + e.start}") from None
    try:
        header = json.loads(text, object_pairs_hook=_Object, parse_int=_json_int, parse_float=_json_float,
                            parse_constant=_json_constant)
    except RecursionError:
        raise _header_error(path, head, f"header JSON nests deeper than {_MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise _header_error(path, head, f"header is not JSON: {e}") from None
    problem = _json_problem(header)
    if problem:
        raise _header_error(path, head, f"header JSON {problem}")
    if not isinstance(header, _Object):
        raise _header_error(path, head, f"header is {_short(header)}, expected a JSON object of tensors")

    metadata, tensors, seen_metadata = None, {}, False
    for name, entry in header:
        if name != "__metadata__":
            tensors[name] = _tensor_info(path, name, entry)
        elif seen_metadata:
            raise InputError(f"{path}: __metadata__ appears twice in the header, expected it at most once")
        else:
            seen_metadata = True
            metadata = _metadata(path, entry)

    start = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1].data_offsets):
        begin, end = info.data_offsets
        if begin != start or end < begin:
            raise InputError(f"{_where(path, name)} has data_offsets [{begin}, {end}], expected [{start}, end >= "
                             f"{start}]: sorted by offset, tensors must tile the data without gaps or overlaps")
        start = end
        elements = 1
        for dim in info.shape:
            elements *= dim
            if elements >= _U64:
                break
        bits = elements * DTYPE_BITS[info.dtype]
        described = f"{_where(path, name)} of dtype {info.dtype} and shape {_short(list(info.shape))}"
        if elements >= _U64 or bits >= _U64:
            raise InputError(f"{described} is too big: its size overflows 64 bits")
        if bits % 8:
            raise InputError(f"{described} does not end on a byte boundary")
        if end - begin != bits // 8:
            raise InputError(f"{described} spans {end - begin} bytes, expected {bits // 8}")
    data_size = size - 8 - n
    if start != data_size:
        raise InputError(f"{path}: the tensors cover {start} bytes of data but the file holds {data_size} "
                         f"({'truncated download?' if start > data_size else 'trailing bytes after the last tensor'})")
    return tensors, 8 + n, metadata


def _json_int(text: str):
    """serde_json's integers: within i64 / u64, else (and for "-0") a double."""
    if len(text) <= 20 and text != "-0" and -2 ** 63 <= int(text) < _U64:
        return int(text)
    return _json_float(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} out of range")
    return value


def _json_constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _json_problem(value, depth: int = 1) -> str | None:
    """What serde_json would refuse that Python's json takes: deep nesting, lone UTF-16 surrogates."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a string with a lone UTF-16 surrogate escape"
        return None
    if isinstance(value, list):
        if depth > _MAX_JSON_DEPTH:
            return f"nests deeper than {_MAX_JSON_DEPTH} levels"
        children = (part for pair in value for part in pair) if isinstance(value, _Object) else value
        return next(filter(None, (_json_problem(child, depth + 1) for child in children)), None)
    return None


def _metadata(path: Path, entry) -> dict[str, str] | None:
    if entry is None:
        return None
    if not isinstance(entry, _Object) or not all(isinstance(value, str) for _, value in entry):
        raise InputError(f"{path}: __metadata__ is {_short(entry)}, expected an object of string -> string")
    return dict(entry)


def _tensor_info(path: Path, name: str, entry) -> TensorInfo:
    fields = ("dtype", "shape", "data_offsets")
    where = _where(path, name)
    if isinstance(entry, _Object):
        found = {}
        for key, value in entry:
            if key in found:
                raise InputError(f"{where} repeats the field {key!r}, expected it once")
            if key in fields:
                found[key] = value
        missing = [key for key in fields if key not in found]
        if missing:
            raise InputError(f"{where} lacks {', '.join(missing)}, expected dtype, shape and data_offsets")
        dtype, shape, offsets = (found[key] for key in fields)
    elif type(entry) is list and len(entry) == 3:
        dtype, shape, offsets = entry
    else:
        raise InputError(f"{where} is {_short(entry)}, expected an object with dtype, shape and data_offsets")
    if isinstance(dtype, _Object) and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"{where} has unknown dtype {_short(dtype)}, expected one of {', '.join(DTYPE_BITS)}")
    if not _is_usize_list(shape):
        raise InputError(f"{where} has shape {_short(shape)}, expected a list of non-negative integers")
    if not (_is_usize_list(offsets) and len(offsets) == 2):
        raise InputError(f"{where} has data_offsets {_short(offsets)}, expected [begin, end] of non-negative "
                         "integers")
    return TensorInfo(dtype, tuple(shape), tuple(offsets))


def _is_usize_list(value) -> bool:
    """A list of Rust usize: `_json_int` already made integers of 2**64 and more floats."""
    return type(value) is list and all(type(x) is int and x >= 0 for x in value)


def _where(path: Path | str, name: str) -> str:
    """`file: tensor 'name'` for a message, a name of absurd length cut short."""
    shown = repr(name)
    return f"{path}: tensor {shown if len(shown) <= 80 else shown[:77] + '...'}"


def _short(value) -> str:
    """A parsed JSON value as JSON text for a one-line message, cut to a readable length."""
    def plain(v):
        if isinstance(v, _Object):
            return {key: plain(x) for key, x in v}
        return [plain(x) for x in v] if isinstance(v, list) else v

    text = json.dumps(plain(value))
    return text if len(text) <= 80 else text[:77] + "..."
