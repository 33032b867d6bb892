"""q4lab.formats.safetensors_file: ``save`` / ``load`` a model's state dict as a safetensors file in
bitsandbytes' 4-bit layout (no pickle).

Source: bitsandbytes ``functional.py::QuantState.as_dict(packed=True)`` via ``q4lab.formats.bnb``
(``to_bnb_state_dict`` / ``from_bnb_state_dict``), and safetensors' ``save_file`` / ``safe_open``.
q4lab adds three metadata entries: ``q4lab.format``, ``q4lab.aliases`` (tensors shared under
several names, e.g. tied embeddings, are written once) and ``q4lab.compute_dtypes`` (each 4-bit
layer's compute dtype). docs/bitsandbytes.md lists the keys.
"""
from __future__ import annotations

import json

from torch import nn

from ..nn import Linear4bit
from ..ops import DTYPE_OF_NAME, TORCH_DTYPES
from .atomic import replace_file
from .bnb import from_bnb_state_dict, json_object, to_bnb_state_dict


def save(model: nn.Module, path) -> None:
    """Write ``model``'s state dict to a safetensors file in bitsandbytes' 4-bit layout
    (``q4lab.to_bnb_state_dict``). Tensors shared under several names (tied embeddings) are
    written once; the aliases go into the file's metadata. Written to a temporary file beside
    ``path`` and renamed over it (``q4lab.formats.atomic.replace_file``): an existing file keeps
    its old content if anything fails; a missing folder is a FileNotFoundError."""
    from safetensors.torch import save_file

    state = to_bnb_state_dict(model)
    tensors, aliases = {}, {}
    first: dict = {}
    for k, t in state.items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.device) if t.numel() else None
        if ident is not None and ident in first:
            aliases[k] = first[ident]
            continue
        if ident is not None:
            first[ident] = k
        tensors[k] = t.detach().contiguous().cpu()
    meta = {"format": "pt", "q4lab.format": "bnb-4bit/1", "q4lab.aliases": json.dumps(aliases),
            "q4lab.compute_dtypes": json.dumps(_compute_dtypes(model))}
    with replace_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _compute_dtypes(model: nn.Module) -> dict:
    return {n: TORCH_DTYPES[m.compute_dtype] for n, m in model.named_modules()
            if isinstance(m, Linear4bit)}


def load(model: nn.Module, path, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save` (or any safetensors file of a bitsandbytes 4-bit state
    dict) into ``model``, quantized or not: its ``nn.Linear`` layers stored as 4-bit become
    :class:`Linear4bit`. Everything is checked before the model is touched; a truncated or
    corrupted file, a missing or unexpected key, or a wrong shape or dtype raises ``ValueError``
    and leaves ``model`` unchanged. Returns ``model``."""
    tensors, meta = _read_safetensors(path)
    aliases = _json_meta(meta, "q4lab.aliases", path)
    for alias, target in aliases.items():
        if target not in tensors:
            raise ValueError(f"{path}: alias {alias!r} points at missing tensor {target!r}")
        tensors[alias] = tensors[target]
    dtypes = {n: DTYPE_OF_NAME.get(d) for n, d in
              _json_meta(meta, "q4lab.compute_dtypes", path).items()}
    return from_bnb_state_dict(model, tensors, strict=strict, compute_dtypes=dtypes)


def _read_safetensors(path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot read {path} as safetensors (truncated or corrupted?): "
                         f"{exc}") from exc


def _json_meta(meta: dict, key: str, path) -> dict:
    return json_object(meta[key], f"{path}: metadata {key!r}") if key in meta else {}
