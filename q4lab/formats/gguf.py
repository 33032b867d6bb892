"""GGUF files: write q4lab tensors (Q4_0 / Q4_1 blocks, float32 / float16) and read GGUF tensors
back as q4lab ``(packed, state)`` pairs (Q4_0, Q4_1, Q4_K, IQ4_NL) or float arrays.

Source: the GGUF v3 specification (the ggml repository's gguf.md): little-endian; header = magic
"GGUF", version uint32 3, tensor count uint64, metadata count uint64; metadata = key string (uint64
length + UTF-8) + uint32 value type + value; tensor infos = name, uint32 n_dims, n_dims uint64
dimensions **innermost first** (ggml's ne[0] is the row length, NumPy's shape[-1]), uint32 ggml
type, uint64 offset of the data from the start of the data section; the data section starts at the
next multiple of ``general.alignment`` (default 32) and every tensor's data is aligned to it. ggml
type ids: F32 0, F16 1, Q4_0 2, Q4_1 3, Q4_K 12, IQ4_NL 20. Block bytes are the ones of
``q4lab.reference.gguf_quants`` (docs/formats.md §4): a q4lab Q4_0 tensor's ``packed`` IS the GGUF
tensor data, so writing and reading are exact. Checked against the gguf package's ``GGUFReader`` /
``GGUFWriter`` in tests/test_formats_gguf.py (q4lab never imports it).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..reference import block_formats
from ..reference.gguf_quants import BLOCK_BYTES, BLOCK_VALUES

MAGIC, VERSION, ALIGNMENT = b"GGUF", 3, 32
GGML_TYPES = {"float32": 0, "float16": 1, "q4_0": 2, "q4_1": 3, "q4_k": 12, "iq4_nl": 20}
TYPE_NAMES = {v: k for k, v in GGML_TYPES.items()}
#: GGUF metadata value types (uint32 ids) and their struct codes.
VALUE_TYPES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
               12: "d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: ``data`` is its raw bytes (uint8) for quantized types, else a
    float array of ``shape``; ``quant_type`` is a q4lab name ('q4_0', ...) or a float dtype."""

    name: str
    quant_type: str
    shape: tuple
    data: np.ndarray

    def to_q4lab(self, dtype: str = "float32"):
        """``(packed, state)`` for q4lab.dequantize_4bit (quantized types only)."""
        if self.quant_type not in BLOCK_BYTES:
            raise ValueError(f"tensor {self.name!r} is {self.quant_type}, not a 4-bit GGUF type")
        return block_formats.state_from_gguf(self.data, self.shape, self.quant_type, dtype)


# ---- writing -------------------------------------------------------------------------------
def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):  # uint32 as llama.cpp expects (general.alignment must be), else wider
        if 0 <= v < 2**32:
            return struct.pack("<II", 4, v)
        return struct.pack("<Iq", 11, v) if v < 0 else struct.pack("<IQ", 10, v)
    if isinstance(v, float):
        return struct.pack("<Id", 12, v)
    if isinstance(v, str):
        return struct.pack("<I", STRING) + _string(v)
    raise TypeError(f"GGUF metadata value {v!r}: use bool, int, float or str")


def _tensor_bytes(name, value) -> tuple[str, tuple, bytes]:
    """(ggml type name, shape, data bytes) for a (packed, state) pair or a float array/tensor."""
    if isinstance(value, tuple) and len(value) == 2:
        packed, state = value
        state = state.numpy()
        if state.quant_type not in ("q4_0", "q4_1", "q4_k", "iq4_nl"):
            raise ValueError(f"tensor {name!r}: {state.quant_type} has no GGUF block type; "
                             f"quantize with quant_type='q4_0' or 'q4_1' to write GGUF")
        data = np.ascontiguousarray(np.asarray(packed if isinstance(packed, np.ndarray)
                                               else packed.cpu().numpy(), dtype=np.uint8))
        state.validate(data)
        return state.quant_type, tuple(state.shape), data.tobytes()
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if array.dtype.name not in ("float32", "float16"):
        raise TypeError(f"tensor {name!r}: {array.dtype} is not storable here; convert to "
                        f"float32 or float16 first")
    return array.dtype.name, tuple(array.shape), np.ascontiguousarray(array).tobytes()


def write_gguf(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` ({name: (packed, state) | float array}) and ``metadata`` ({key: bool |
    int | float | str}) as a GGUF v3 file. Returns the path."""
    path = Path(path)
    metadata = {"general.alignment": ALIGNMENT, **(metadata or {})}
    if metadata["general.alignment"] != ALIGNMENT:
        raise ValueError(f"general.alignment must be {ALIGNMENT} here")
    items = [(name, *_tensor_bytes(name, value)) for name, value in tensors.items()]
    head = MAGIC + struct.pack("<IQQ", VERSION, len(items), len(metadata))
    head += b"".join(_string(k) + _value(v) for k, v in metadata.items())
    offset, infos = 0, []
    for name, kind, shape, data in items:
        dims = tuple(reversed(shape)) or (1,)
        infos.append(_string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
                     + struct.pack("<IQ", GGML_TYPES[kind], offset))
        offset += -(-len(data) // ALIGNMENT) * ALIGNMENT
    head += b"".join(infos)
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % ALIGNMENT))
        for _, _, _, data in items:
            f.write(data + b"\0" * (-len(data) % ALIGNMENT))
    return path


# ---- reading -------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        n = self.take("Q")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            inner, n = self.take("I"), self.take("Q")
            return [self.value(inner) for _ in range(n)]
        if kind not in VALUE_TYPES:
            raise ValueError(f"GGUF metadata value type {kind} is unknown (corrupt file?)")
        return self.take(VALUE_TYPES[kind])


def read_gguf(path) -> tuple[dict, dict]:
    """``(metadata, {name: GGUFTensor})`` of a GGUF v2/v3 file. Tensors of other ggml types are
    listed with ``quant_type`` 'ggml_type_<id>' and their raw bytes left unread (data None)."""
    buf = Path(path).read_bytes()
    if buf[:4] != MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {buf[:4]!r}, expected b'GGUF')")
    cur = _Cursor(buf)
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("IQQ")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        dims = [cur.take("Q") for _ in range(n_dims)]
        kind, offset = cur.take("IQ")
        infos.append((name, tuple(reversed(dims)), kind, offset))
    alignment = int(metadata.get("general.alignment", ALIGNMENT))
    start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, kind, offset in infos:
        qt = TYPE_NAMES.get(kind, f"ggml_type_{kind}")
        numel = int(np.prod(shape))
        if qt in BLOCK_BYTES:
            nbytes = numel // BLOCK_VALUES[qt] * BLOCK_BYTES[qt]
            data = np.frombuffer(buf, np.uint8, nbytes, start + offset).copy()
        elif qt in ("float32", "float16"):
            data = np.frombuffer(buf, qt, numel, start + offset).reshape(shape).copy()
        else:
            data = None
        tensors[name] = GGUFTensor(name, qt, shape, data)
    return metadata, tensors
