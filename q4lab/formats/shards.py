"""Safetensors checkpoints tensor by tensor: reading, writing shards, and ``quantize_checkpoint``.

Sources: the safetensors format (huggingface/safetensors README: 8-byte little-endian header length,
a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
padded with spaces, then the tensors' bytes back to back, offsets contiguous from 0) and
transformers' sharding (``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``
= ``{"metadata": {"total_size"}, "weight_map": {name: file}}``; one shard is ``model.safetensors``).

Why not ``safetensors.safe_open(...).get_tensor``: it memory-maps the whole shard and every page
it touches stays in the process's resident set until the file is closed (measured here: reading a
537 MB shard tensor by tensor raised RSS by 530 MB). ``read_tensor`` reads one tensor's bytes with
``readinto`` into a fresh tensor, and tensors that are copied unchanged never become tensors at all:
``ShardWriter`` copies their bytes in 16 MiB chunks. ``safe_open`` still checks every shard's
header before anything is written (the safetensors library's own verdict), beside q4lab's checks.

``ShardWriter`` appends each tensor's bytes to a temporary file as it comes and, when a shard is
full, writes the shard: header, then the tensors ordered as safetensors orders them (larger element
size first, then by name, so every tensor is aligned to its element size). ``save_pretrained`` and
``quantize_checkpoint`` both write through it, into the staging directory of
``q4lab.formats.atomic.write_directory`` (docs/data-safety.md).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16,
          "U32": torch.uint32, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
CHUNK = 16 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: absolute byte range ``[begin, end)`` in ``path``."""
    key: str
    path: Path
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# ---- reading -------------------------------------------------------------------------------------
def read_header(path) -> tuple[dict, dict]:
    """``({key: Entry}, metadata)`` of one safetensors file, checked: known dtypes, sizes that
    match the shapes, contiguous offsets, and a file exactly as long as the header says (a
    truncated download is named as such)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path} is truncated or not safetensors: header length {n} but "
                             f"the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start, entries, end = 8 + n, {}, 0
    for key, info in sorted(header.items(), key=lambda kv: _offsets(kv, path)):
        b, e = _offsets((key, info), path)
        dtype = DTYPES.get(info.get("dtype"))
        shape = info.get("shape")
        if dtype is None or not isinstance(shape, list):
            raise ValueError(f"{path}: tensor {key!r} has dtype {info.get('dtype')!r} / shape "
                             f"{shape!r} that q4lab cannot read")
        numel = 1
        for d in shape:
            numel *= int(d)
        if b != end or e - b != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {key!r} has byte range [{b}, {e}) that does not "
                             f"follow the previous tensor or fit {info['dtype']} {shape}")
        end = e
        entries[key] = Entry(key, path, dtype, tuple(int(d) for d in shape), start + b, start + e)
    if start + end != size:
        what = "truncated" if start + end > size else "longer than its header says"
        raise ValueError(f"{path} is {what}: the header describes {end:,} bytes of tensor data, "
                         f"the file holds {size - start:,}")
    return entries, meta


def _offsets(kv, path) -> tuple[int, int]:
    key, info = kv
    off = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off)
            and 0 <= off[0] <= off[1]):
        raise ValueError(f"{path}: tensor {key!r} has no valid data_offsets")
    return off[0], off[1]


def inventory(directory) -> tuple[dict, list]:
    """Every tensor of a checkpoint directory, ``({key: Entry}, [shard paths])``: one
    ``model.safetensors`` or the shards named by ``model.safetensors.index.json``. Checks that each
    shard exists and is whole (safetensors' ``safe_open`` and :func:`read_header`), that the index
    and the shards agree key for key, and that no tensor is in two shards."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index} is not a valid index (needs a 'weight_map'): {exc}") from exc
        shards = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        other = sorted(p.name for p in directory.glob("*.bin"))
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor {INDEX}"
                                + (f" ({other} are pickle files, which q4lab does not read)"
                                   if other else ""))
    entries: dict = {}
    for name in shards:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"shard {name} named by {INDEX} is missing from {directory}")
        found, _ = read_header(path)
        try:
            with safe_open(str(path), "pt") as f:
                if set(f.keys()) != set(found):
                    raise ValueError(f"{path}: safetensors and q4lab read different keys")
        except SafetensorError as exc:
            raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
        twice = sorted(set(found) & set(entries))
        if twice:
            raise ValueError(f"tensors {twice[:4]} are stored in more than one shard")
        entries.update(found)
    if weight_map is not None:
        absent = sorted(k for k, v in weight_map.items()
                        if k not in entries or entries[k].path.name != v)
        if absent:
            k = absent[0]
            raise ValueError(f"{INDEX} names {len(absent)} tensors that are not in the shard it "
                             f"gives, first {k!r} (index: {weight_map[k]})")
        unlisted = sorted(set(entries) - set(weight_map))
        if unlisted:
            raise ValueError(f"shards hold tensors {unlisted[:4]} that {INDEX} does not list")
    return entries, [directory / s for s in shards]


def read_tensor(entry: Entry) -> torch.Tensor:
    """The tensor ``entry`` describes, read into fresh memory (no memory map)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else b""
    with open(entry.path, "rb", buffering=0) as f:
        f.seek(entry.begin)
        got = 0
        while got < entry.nbytes:
            n = f.readinto(buf[got:])
            if not n:
                raise ValueError(f"{entry.path} ended inside tensor {entry.key!r} (truncated)")
            got += n
    return out


# ---- writing -------------------------------------------------------------------------------------
def parse_size(size) -> int:
    """Bytes in ``size``: an int, or "5GB" / "500MB" (powers of 10) / "2GiB" (powers of 2), as
    transformers' ``max_shard_size``."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size={size!r}: give bytes (int) or e.g. '5GB', '500MB'")
        power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
        n = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r} is {n} bytes; it must be at least 1 byte "
                         f"(e.g. '5GB', transformers' default)")
    return n


class ShardWriter:
    """Write tensors into safetensors shards in ``directory`` without holding them: ``add`` a
    group (kept in one shard) of tensors or :class:`Entry` (bytes copied from the source file),
    then ``finish``."""

    def __init__(self, directory, max_shard_bytes: int, metadata: dict | None = None):
        self.directory = Path(directory)
        self.max = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[tuple[Path, list]] = []
        self._data = None
        self._records: list = []
        self._size = 0
        self.total = 0

    def add(self, group: dict) -> None:
        size = sum(_nbytes(v) for v in group.values())
        if self._records and self._size + size > self.max:
            self._close_shard()
        if self._data is None:
            self._data = open(self.directory / f".shard-{len(self.shards) + 1}.data", "w+b")
        for key, value in group.items():
            self._write(key, value)

    def _write(self, key: str, value) -> None:
        if isinstance(value, Entry):
            dtype, shape = value.dtype, value.shape
            with open(value.path, "rb") as src:
                src.seek(value.begin)
                left = value.nbytes
                while left:
                    chunk = src.read(min(CHUNK, left))
                    if not chunk:
                        raise ValueError(f"{value.path} ended inside {value.key!r} (truncated)")
                    self._data.write(chunk)
                    left -= len(chunk)
        else:
            t = value.detach().cpu().contiguous()
            dtype, shape = t.dtype, tuple(t.shape)
            if dtype not in NAMES:
                raise TypeError(f"{key!r}: dtype {dtype} cannot be stored in safetensors")
            if t.numel():
                self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        n = _nbytes(value)
        self._records.append((key, dtype, shape, self._size, n))
        self._size += n
        self.total += n

    def _close_shard(self) -> None:
        order = sorted(self._records, key=lambda r: (-r[1].itemsize, r[0]))
        header, pos = {"__metadata__": self.metadata}, 0
        for key, dtype, shape, _, n in order:
            header[key] = {"dtype": NAMES[dtype], "shape": list(shape),
                           "data_offsets": [pos, pos + n]}
            pos += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)
        path = self.directory / f".shard-{len(self.shards) + 1}.safetensors"
        data, self._data = self._data, None
        with open(path, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for _, _, _, start, n in order:
                data.seek(start)
                left = n
                while left:
                    chunk = data.read(min(CHUNK, left))
                    out.write(chunk)
                    left -= len(chunk)
        data.close()
        os.unlink(data.name)
        self.shards.append((path, [r[0] for r in order]))
        self._records, self._size = [], 0

    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index when there
        is more than one; returns the file names."""
        if self._records:
            self._close_shard()
        if not self.shards:
            raise ValueError("nothing to write: no tensors were added")
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else \
            [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        weight_map = {}
        for (path, keys), name in zip(self.shards, names):
            os.replace(path, self.directory / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True)
                                                + "\n")
        return names


def _nbytes(value) -> int:
    return value.nbytes if isinstance(value, Entry) else value.numel() * value.element_size()
