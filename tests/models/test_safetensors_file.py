"""The safetensors reader against the reference library, and the loaders' refusals (FIFO, pickle, NaN weights).

The fuzz test mutates real files (header bytes, JSON edits, length field, truncation, ...) and requires
jaxrisk to accept exactly the files `safetensors` accepts, with bit-identical tensors.
"""

import json
import os
import pickle
import random
import struct
import threading
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors import safe_open
from safetensors.numpy import save, save_file

from jaxrisk.errors import InputError
from jaxrisk.models import build, load_classifier, load_pretrained, logits_fn, pure_apply, torch_state_dict
from jaxrisk.models.hf import key_map
from jaxrisk.models.lm_config import config_from_hf
from jaxrisk.models.safetensors_file import (DTYPE_BITS, MAX_HEADER_BYTES, NUMPY_DTYPES, open_safetensors,
                                             read_header)

# the dtypes safetensors 0.8 knows; the test must not take them from the module under test
LIBRARY_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
                  "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]


def test_dtype_tables_match_the_library():
    assert list(DTYPE_BITS) == LIBRARY_DTYPES
    assert {name: dtype.name for name, dtype in NUMPY_DTYPES.items()} == {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
        "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
        "F32": "float32", "C64": "complex64", "F64": "float64", "I64": "int64", "U64": "uint64"}  # not F4, F6_*


# ---- fuzz against the library ---------------------------------------------------------------------------

def _base_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    many = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float16),
        "h": rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16),
        "q": rng.normal(size=4).astype(ml_dtypes.float8_e4m3fn),
        "i": np.array([-1, 2**40], np.int64),
        "u": np.arange(5, dtype=np.uint8),
        "m": np.array([True, False, True]),
        "c": np.array([1 + 2j, -3j], np.complex64),
        "e": np.zeros((0, 3), np.float32),
        "s": np.array(7.5, np.float64),
    }
    return [save(many, metadata={"format": "pt", "note": "fuzz"}),
            save({"x": rng.normal(size=(2, 2))}),
            save({}, metadata={"only": "metadata"})]


def _split(blob: bytes) -> tuple[dict, bytes]:
    """(header as a dict, data section) of a valid file."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _join(header_text: str, data: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _byte_level(rng: random.Random, blob: bytes) -> bytes:
    """One edit of the raw bytes: header byte, length field, truncation, appended bytes, bad UTF-8, data byte."""
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    kind = rng.choice(["flip", "flip", "length", "truncate", "append", "not_utf8", "data"])
    out = bytearray(blob)
    if kind == "flip" and len(out) > 8:
        out[rng.randrange(8, min(len(out), 8 + n + 1))] = rng.randrange(256)
    elif kind == "length":
        size = len(blob)
        value = rng.choice([0, 1, n - 1, n + 1, size - 8, size - 7, 2**60, 2**64 - 1, 100_000_001, 100_000_000])
        out[:8] = struct.pack("<Q", value % 2**64)
    elif kind == "truncate":
        del out[rng.randrange(len(out) + 1):]
    elif kind == "append":
        out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "not_utf8" and n:
        at = rng.randrange(8, 8 + n)
        out[at:at + 1] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"])
    elif kind == "data" and len(out) > 8 + n:  # any data bytes are valid, NaN patterns included
        out[rng.randrange(8 + n, len(out))] = rng.randrange(256)
    return bytes(out)


class _Raw(str):
    """JSON text that `_dump` writes verbatim: duplicate keys, -0, lone surrogates and the like."""


def _dump(value) -> str:
    """JSON text of `value`, keeping `_Raw` parts as they are."""
    if isinstance(value, _Raw):
        return value
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_dump, value)) + "]"
    return json.dumps(value)


def _json_level(rng: random.Random, header: dict, data: bytes) -> tuple[str, bytes]:
    """One edit of the parsed header (offsets, dtype, shape, forms serde takes ...): (header text, data section)."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names) if names else None
    entry = header[name] if name else None
    kind = rng.choice(["offsets", "offsets", "dtype", "dtype", "shape", "shape", "new_empty", "relayout", "duplicate",
                       "metadata", "form", "number", "nesting", "text", "not_object"])
    if kind == "offsets" and entry:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([
            [-1, end], [begin, -end], [begin - 1, end], [begin, end - 1], [begin + 1, end + 1], [begin, end + 8],
            [end, begin], [begin, end, end], [begin], [float(begin), end], [str(begin), end], [begin, 2**64],
            [begin, 2**64 - 1], [2**63, 2**63], [0, len(data)], [begin, len(data) + 1]])
    elif kind == "dtype" and entry:
        old = entry["dtype"]
        bits = DTYPE_BITS[old]
        same_width = [d for d in LIBRARY_DTYPES if DTYPE_BITS[d] == bits]
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        packed = rng.choice([("F4", [nbytes * 2]), ("F6_E3M2", [nbytes * 8 // 6]), ("F6_E2M3", [nbytes * 4 // 3])])
        choice = rng.choice(["unknown", "other", "same", "same", "packed"])
        if choice == "unknown":
            entry["dtype"] = rng.choice(["F31", "f32", "", "FLOAT", "F8", "bfloat16", "I128"])
        elif choice == "other":
            entry["dtype"] = rng.choice(LIBRARY_DTYPES)
        elif choice == "same":
            entry["dtype"] = rng.choice(same_width)
        else:
            entry["dtype"], entry["shape"] = packed
    elif kind == "shape" and entry:
        shape = entry["shape"]
        entry["shape"] = rng.choice([
            [2**63, 2**63], [2**63, 2**63, 0], [0, 2**63, 2**63], [2**64 - 1, 0], [2**62, 0, 4], [-1], shape + [1],
            shape + [2], shape[:-1], shape[::-1], [1] * 65 + shape, [int(np.prod(shape))], [2.0], ["2"], shape + [True],
            [None], "3", {}, _Raw("[-0]"), _Raw("[1e400]"), [2**64]])
    elif kind == "new_empty":  # a zero-byte tensor at the end of the data: its shape alone decides
        header["z"] = {"dtype": rng.choice(LIBRARY_DTYPES), "data_offsets": [len(data), len(data)], "shape": rng.choice(
            [[0], [3, 0], [2**63, 2**63, 0], [0, 2**63, 2**63], [2**64 - 1, 0], [2**62, 0, 4], [0] * 65, [1] * 64])}
    elif kind == "relayout" and names:  # move the tensors' bytes into another order: still valid
        order = sorted(names, key=lambda k: header[k]["data_offsets"])
        rng.shuffle(order)
        chunks, start = [], 0
        for key in order:
            begin, end = header[key]["data_offsets"]
            chunks.append(data[begin:end])
            header[key]["data_offsets"] = [start, start + end - begin]
            start += end - begin
        data = b"".join(chunks)
    elif kind == "duplicate":  # serde: a repeated key keeps its last value (all must be valid); a repeated field fails
        copies = ['"__metadata__":{"a":"b"}', '"__metadata__":null']
        if entry:
            key = json.dumps(name)
            copies += [f"{key}:{_dump(entry)}", f'{key}:{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
                       f'{key}:{{"dtype":"XX","shape":[1],"data_offsets":[0,1]}}',
                       f'{key}:{_dump(entry)[:-1]},"dtype":{json.dumps(entry["dtype"])}}}']
        text = _dump(header)[:-1]
        return text + ("," if len(text) > 1 else "") + rng.choice(copies) + "}", data
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([None, {"k": 1}, ["a"], {"k": {"x": "y"}}, "text", {}, {"k": "v"},
                                             _Raw('{"k":"1","k":"2"}')])
        if rng.random() < 0.2:
            del header["__metadata__"]
    elif kind == "form" and entry:
        fields = [entry["dtype"], entry["shape"], entry["data_offsets"]]
        header[name] = rng.choice([
            fields, fields[:2], fields + [0], [{fields[0]: None}, *fields[1:]], dict(entry, extra=[1, {"x": None}]),
            dict(entry, dtype={fields[0]: None}), dict(entry, dtype={fields[0]: 0}), dict(entry, dtype=[fields[0]]),
            {"dtype": fields[0], "shape": fields[1]}, None, []])
    elif kind == "number" and entry:
        entry["extra"] = _Raw(rng.choice(["1e400", "-1e400", "9" * 400, "-0", "1.5", "-5", "NaN", "Infinity",
                                          "18446744073709551616", "0.1e-400", "01", "1."]))
    elif kind == "nesting" and entry:
        depth = rng.choice([124, 125, 126, 127, 1500])
        entry["extra"] = _Raw("[" * depth + "]" * depth)
    elif kind == "text":
        text = _dump(header)
        return rng.choice([
            "  " + text + " \n\t ", text + "x", text + "\x00\x00", "\ufeff" + text,
            text.replace('"', '"\\ud800', 1), text.replace('"', '"\\ud83d\\ude00', 1), text.replace('"', '"\x01', 1),
            text.replace('"', '"\\u0041', 1), text[:-1]]), data
    elif kind == "not_object":
        return rng.choice(["[]", "1", '"x"', "null", "true", f"[{_dump(header)}]", ""]), data
    return _dump(header), data


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    """One JSON-level or byte-level edit of a valid file, sometimes followed by a byte-level one."""
    blob = _join(*_json_level(rng, *_split(blob))) if rng.random() < 0.7 else _byte_level(rng, blob)
    return _byte_level(rng, blob) if rng.random() < 0.25 else blob


def _library(path):
    """(tensors as (dtype, shape, raw bytes), metadata) as the reference library reads the file, or None."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
    except Exception:  # the library's way of refusing a file
        return None
    tensors = {name: (view["dtype"], tuple(view["shape"]), bytes(view["data"]))
               for name, view in safetensors.deserialize(path.read_bytes())}
    return tensors, metadata


def _ours(read, path):
    try:
        return read(path), None
    except InputError as e:
        return None, str(e)


def test_fuzzed_files_are_accepted_exactly_when_the_library_accepts_them(tmp_path):
    rng = random.Random(1234)
    bases = _base_files()
    counts = {"accepted": 0, "rejected": 0, "numpy_cannot_hold": 0}
    wrong = []
    for case in range(1500):
        blob = _mutate(rng, bases[case % len(bases)])
        path = tmp_path / f"case{case}.safetensors"
        path.write_bytes(blob)
        reference = _library(path)
        header, header_error = _ours(read_header, path)
        arrays, error = _ours(open_safetensors, path)
        for message in filter(None, (header_error, error)):
            if path.name not in message or "\n" in message:
                wrong.append(f"case {case}: message does not name the file on one line: {message!r}")
        if reference is None:
            counts["rejected"] += 1
            if header_error is None or error is None:
                wrong.append(f"case {case}: the library refuses it, jaxrisk accepts it: {blob[:300]!r}")
            continue
        tensors, metadata = reference
        if header_error is not None:
            wrong.append(f"case {case}: the library accepts it, jaxrisk refuses it: {header_error}")
            continue
        infos, data_start, our_metadata = header
        header_end = 8 + int.from_bytes(blob[:8], "little")
        if our_metadata != metadata or set(infos) != set(tensors) or data_start != header_end:
            wrong.append(f"case {case}: header differs from the library's: {our_metadata}, {sorted(infos)}")
        if error is not None:  # allowed only where numpy has no such dtype or shape: skipped, and counted
            if "unsupported" not in error:
                wrong.append(f"case {case}: the library accepts it, jaxrisk refuses it: {error}")
            counts["numpy_cannot_hold"] += 1
            continue
        counts["accepted"] += 1
        for name, (dtype, shape, raw) in tensors.items():
            ours = arrays[name]
            if (infos[name].dtype, ours.shape, ours.dtype, ours.tobytes()) != (dtype, shape, NUMPY_DTYPES[dtype], raw):
                wrong.append(f"case {case}: tensor {name!r} differs from the library's")
    print(counts)
    assert not wrong, "\n".join(wrong[:20])
    assert counts["accepted"] >= 300 and counts["rejected"] >= 800 and counts["numpy_cannot_hold"] >= 20, counts


def test_library_accepts_packed_dtypes_that_numpy_cannot_hold(tmp_path):
    path = tmp_path / "packed.safetensors"
    path.write_bytes(_join('{"p":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}', b"\x12\x34"))
    assert _library(path) is not None
    assert read_header(path)[0]["p"].dtype == "F4"
    with pytest.raises(InputError, match=r"packed\.safetensors: tensor 'p' has unsupported dtype F4"):
        open_safetensors(path)


def test_header_size_limit_is_the_libraries(tmp_path):
    path = tmp_path / "big.safetensors"
    for n in (MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1):
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", n) + b"{}" + b" " * (n - 2))
        assert (_library(path) is not None) == (n == MAX_HEADER_BYTES)
        if n == MAX_HEADER_BYTES:
            assert read_header(path) == ({}, 8 + n, None)
        else:
            with pytest.raises(InputError, match=r"header length 100000001 is over the 100000000-byte limit"):
                read_header(path)
    path.unlink()


def test_header_length_limits_and_offset_errors_name_file_and_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(InputError, match=rf"bad\.safetensors: not a safetensors file \(header length {2**60} is over"):
        read_header(path)
    path.write_bytes(_join('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                           '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', bytes(6)))
    with pytest.raises(InputError, match=r"bad\.safetensors: tensor 'b' has data_offsets \[2, 6\], expected \[4, "):
        read_header(path)
    path.write_bytes(_join('{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b""))
    with pytest.raises(InputError, match=r"bad\.safetensors: tensor 'a' of dtype F32 and shape .* overflows 64 bits"):
        read_header(path)


# ---- refusals: not a regular file, pickles ------------------------------------------------------------------

def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            load_classifier(fifo, "mlp")
        except InputError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert outcome and "model.safetensors: not a regular file" in outcome[0]
    with pytest.raises(InputError, match="is a directory"):
        read_header(tmp_path)


class _Payload:
    """Unpickling this creates the file at `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["pickle", "zip"])
def test_pickle_under_a_safetensors_name_is_refused_unread(tmp_path, container):
    marker = tmp_path / "executed"
    payload = pickle.dumps({"fc1.weight": _Payload(marker)}, protocol=4)
    path = tmp_path / "model.safetensors"
    if container == "pickle":
        path.write_bytes(payload)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    assert path.read_bytes()[:2] in (b"\x80\x04", b"PK")
    for read in (read_header, open_safetensors):
        with pytest.raises(InputError, match="model.safetensors: it looks like a PyTorch pickle checkpoint, which "
                                             "jaxrisk refuses to load: unpickling executes code"):
            read(path)
    _tiny_llama(tmp_path)
    with pytest.raises(InputError, match="refuses to load: unpickling executes code"):
        load_pretrained(tmp_path)
    assert not marker.exists()


# ---- weights: NaN / inf refused, bf16 / f16 accepted ----------------------------------------------------------

def _tiny_llama(path) -> dict[str, np.ndarray]:
    """Write a tiny Llama config.json into `path`; return random float32 weights for it, by Hugging Face key."""
    hf = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 40, "max_position_embeddings": 32}
    (path / "config.json").write_text(json.dumps(hf))
    entries, _ = key_map(config_from_hf(hf))
    rng = np.random.default_rng(0)
    return {e.key: (0.1 * rng.normal(size=e.shape)).astype(np.float32) for e in entries}


def test_non_finite_weights_are_refused_with_the_tensor_named(tmp_path):
    state = torch_state_dict(build("mlp", input_shape=(1, 4, 4), hidden=(8,), num_classes=3))
    state["fc1.weight"][0, :3] = [np.nan, np.inf, -np.inf]
    save_file(state, str(tmp_path / "mlp.safetensors"))
    with pytest.raises(InputError, match=r"mlp\.safetensors: tensor 'fc1.weight' has 3 NaN / inf values; "
                                         "refusing to scan a model whose weights are not finite"):
        load_classifier(tmp_path / "mlp.safetensors", "mlp")

    weights = _tiny_llama(tmp_path)
    save_file(weights, str(tmp_path / "model.safetensors"))
    load_pretrained(tmp_path)  # finite: loads
    weights["model.layers.0.mlp.up_proj.weight"][5, 7] = np.nan
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"model\.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has 1 NaN"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_classifier_weights_load(tmp_path, dtype):
    model = build("mlp", input_shape=(1, 4, 4), hidden=(8,), num_classes=3, seed=1)
    state = torch_state_dict(model)
    save_file({k: v.astype(dtype) for k, v in state.items()}, str(tmp_path / "half.safetensors"))
    save_file({k: v.astype(dtype).astype(np.float32) for k, v in state.items()}, str(tmp_path / "rounded.safetensors"))
    x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (5, 1, 4, 4)), jnp.float32)
    half, rounded = (np.asarray(logits_fn(*pure_apply(load_classifier(tmp_path / f, "mlp")), x))
                     for f in ("half.safetensors", "rounded.safetensors"))
    full = np.asarray(logits_fn(*pure_apply(model), x))
    np.testing.assert_array_equal(half, rounded)  # loading half precision = the same values in float32
    assert np.abs(half - full).max() <= 4 * float(ml_dtypes.finfo(dtype).eps) * (1 + np.abs(full).max())
