"""bitsandbytes state-dict interop: ``to_bnb_state_dict`` / ``from_bnb_state_dict``.

Source: bitsandbytes 0.50.2 ``functional.py::QuantState.as_dict(packed=True)`` / ``from_dict`` and
``nn/modules.py::Linear4bit._save_to_state_dict`` (docs/format.md §10). A 4-bit layer ``<p>`` is
stored as ``<p>.weight`` (packed uint8, shape ``((n+1)//2, 1)``), ``<p>.weight.absmax``,
``<p>.weight.quant_map`` (16 float32), and with double quant ``<p>.weight.nested_absmax`` and
``<p>.weight.nested_quant_map`` (256 float32), plus
``<p>.weight.quant_state.bitsandbytes__<nf4|fp4>``: a uint8 tensor of the UTF-8 JSON
``{"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
"nested_offset"}`` (``QuantState.bnb_json``). Every other entry is the module's ordinary state dict.
q4lab's "int4" has no bitsandbytes equivalent and is refused. Loading checks everything first
(keys, shapes, sizes against the shape and blocksize, codebooks, and every statistic: absmax and
nested absmax finite and >= 0, the offset finite; docs/data-safety.md) and only then changes the
model.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from .. import ops, storage
from .. import reference as ref
from ..constants import BNB_QUANT_TYPES, CODES, DYNAMIC_CODES, NESTED_BLOCKSIZE, NESTED_DTYPE, \
    NESTED_QUANT_TYPE
from ..nn import Linear4bit
from ..quantize import set_submodule
from ..reference.api import check_blocksize
from ..state import QuantState, nested_state

_QS = "weight.quant_state.bitsandbytes__"


# ---- export -------------------------------------------------------------------------------------
def layer_state_dict(layer: Linear4bit) -> dict:
    """One layer's bitsandbytes keys (without prefix): weight, weight.*, bias."""
    s = layer.quant_state
    if s.quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"quant_type {s.quant_type!r} has no bitsandbytes equivalent (bnb stores "
                         f"only nf4 and fp4); re-quantize with quant_type='nf4' to export")
    out = {"weight": layer.packed.reshape(-1, 1), "weight.absmax": s.absmax,
           "weight.quant_map": _f32(s.code).clone()}
    if s.nested:
        out["weight.nested_absmax"] = s.state2.absmax
        out["weight.nested_quant_map"] = _f32(s.state2.code).clone()  # own copy per layer, as bnb
    text = json.dumps(s.bnb_json()).encode("utf-8")
    out[_QS + s.quant_type] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    return out


def _f32(a) -> torch.Tensor:
    return a.float() if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, np.float32))


def to_bnb_state_dict(model_or_layer: nn.Module) -> dict:
    """The state dict of a model (or one ``Linear4bit``) with every q4lab 4-bit layer written in
    bitsandbytes' keys; loads into ``bitsandbytes.nn.Linear4bit`` (``Params4bit.from_prequantized``
    or transformers' bnb loader). Tensors are not copied."""
    if isinstance(model_or_layer, Linear4bit):
        return layer_state_dict(model_or_layer)
    if not isinstance(model_or_layer, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model_or_layer).__name__}")
    layers = {n: m for n, m in model_or_layer.named_modules() if isinstance(m, Linear4bit)}
    out = {}
    for key, t in model_or_layer.state_dict(keep_vars=False).items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in layers and leaf in ("packed", "bias"):
            continue
        out[key] = t
    for name, layer in layers.items():
        out.update({f"{name}.{k}": v for k, v in layer_state_dict(layer).items()})
    return out


# ---- import: parse and check ---------------------------------------------------------------------
def _json_of(key: str, t) -> dict:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"{key!r} must be a 1-D uint8 tensor of UTF-8 JSON, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} "
                         f"{tuple(getattr(t, 'shape', ()))}")
    return json_object(bytes(t.cpu().numpy()), repr(key))


def json_object(text, what: str) -> dict:
    """The JSON object in ``text`` (str or UTF-8 bytes); ValueError naming ``what`` when it is not
    valid UTF-8 JSON or not an object. Used for bnb's quant_state entries and q4lab's safetensors
    metadata (``q4lab.formats.safetensors_file``)."""
    try:
        d = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} does not hold valid JSON: {exc}") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(d).__name__}")
    return d


def _tensor(sd: dict, key: str, dtype: torch.dtype, shape: tuple | None = None) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"missing key {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key!r} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key!r} has dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def _check_table(key: str, got: torch.Tensor, want: np.ndarray) -> None:
    g = got.detach().cpu().numpy().astype(np.float32)
    diff = np.flatnonzero(g.view(np.uint32) != want.view(np.uint32))
    # bnb's FP4 table writes index 8 as +0.0; accept either zero where q4lab's entry is a zero
    diff = [i for i in diff if not (g[i] == 0 and want[i] == 0)]
    if diff:
        i = diff[0]
        raise ValueError(f"{key!r} differs from q4lab's table at {len(diff)} of {want.size} "
                         f"entries, first at {i} (file {g[i]!r}, q4lab {want[i]!r}); q4lab decodes "
                         f"with its own fixed tables and cannot represent this checkpoint")


def parse_layer(sd: dict, prefix: str) -> tuple[torch.Tensor, QuantState, torch.Tensor | None]:
    """``(packed 1-D, QuantState, bias or None)`` for the bnb entries of layer ``prefix``
    ("" for a bare layer dict); ``packed`` keeps the file's storage dtype (uint8, or the bytes
    viewed as bf16 etc.: bitsandbytes' ``quant_storage``). ValueError names the first problem."""
    p = f"{prefix}." if prefix else ""
    qs_keys = [k for k in sd if k.startswith(p + _QS) and "." not in k[len(p + _QS):]]
    if len(qs_keys) != 1:
        raise ValueError(f"layer {prefix!r}: expected exactly one {p}{_QS}<nf4|fp4> key, "
                         f"found {qs_keys}")
    meta = _json_of(qs_keys[0], sd[qs_keys[0]])
    qt = qs_keys[0][len(p + _QS):]
    need = ("quant_type", "blocksize", "dtype", "shape")
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{qs_keys[0]!r}: JSON lacks {missing}")
    if meta["quant_type"] != qt or qt not in BNB_QUANT_TYPES:
        raise ValueError(f"{qs_keys[0]!r}: quant_type {meta['quant_type']!r} does not match the "
                         f"key suffix {qt!r} (bitsandbytes stores nf4 or fp4)")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(
            isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"{qs_keys[0]!r}: shape {shape!r} is not a 2-D weight shape")
    n = shape[0] * shape[1]
    raw = sd.get(p + "weight")
    if not isinstance(raw, torch.Tensor) or raw.dtype in (torch.bool,) or raw.is_complex():
        raise ValueError(f"{p}weight must be a tensor of packed 4-bit bytes (uint8, or viewed as "
                         f"the quant_storage dtype), got {getattr(raw, 'dtype', type(raw))}")
    want = storage.storage_numel((n + 1) // 2, raw.dtype)
    if raw.numel() != want or raw.dim() not in (1, 2) or (raw.dim() == 2 and raw.shape[1] != 1):
        raise ValueError(f"{p}weight has shape {tuple(raw.shape)} and dtype {raw.dtype}; a "
                         f"{tuple(shape)} weight packs into {(n + 1) // 2} bytes = ({want}, 1) "
                         f"{str(raw.dtype).removeprefix('torch.')} values")
    nested = "nested_offset" in meta or (p + "weight.nested_absmax") in sd
    bs = _blocksize(meta["blocksize"], qs_keys[0])
    nblocks = -(-n // bs)
    absmax = _tensor(sd, p + "weight.absmax", torch.uint8 if nested else torch.float32,
                     (nblocks,))
    _check_table(p + "weight.quant_map", _tensor(sd, p + "weight.quant_map", torch.float32,
                                                 (CODES,)), ref.codebook(qt))
    state = QuantState(shape=tuple(shape), dtype=str(meta["dtype"]), blocksize=bs, quant_type=qt,
                       code=ops._table(qt, raw.device), absmax=absmax)
    if nested:
        state.offset, state.state2 = _nested_parts(sd, p, meta, nblocks, raw.device)
        _check_statistic(p + "weight.nested_absmax", state.state2.absmax)
    else:
        _check_statistic(p + "weight.absmax", absmax)
    try:
        ops.check_state(storage.as_bytes(raw.reshape(-1), (n + 1) // 2), state)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"layer {prefix!r}: {exc}") from exc
    bias = sd.get(p + "bias")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (
            shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"{p}bias must be a float tensor of shape ({shape[0]},), got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    return raw.reshape(-1), state, bias


def _check_statistic(key: str, values: torch.Tensor) -> None:
    """An absmax (plain or nested) is the largest |value| of its block: finite and >= 0. A NaN
    or Inf here decodes to NaN weights silently, so the file is refused before any tensor reaches
    a model."""
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{key!r} has {int(bad.sum())} of {values.numel()} values that are NaN, "
                         f"Inf or negative, first at block {i} ({float(values[i])!r}); an absmax "
                         f"is the largest |weight| of its block, so this checkpoint is corrupted: "
                         f"re-download or re-quantize it")


def _blocksize(value, key: str) -> int:
    try:
        return check_blocksize(value)
    except ValueError as exc:
        raise ValueError(f"{key!r}: {exc}") from exc


def _nested_parts(sd, p, meta, nblocks, device):
    if meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE or \
            meta.get("nested_dtype", NESTED_DTYPE) != NESTED_DTYPE:
        raise ValueError(f"{p}{_QS}: nested_blocksize must be {NESTED_BLOCKSIZE} and nested_dtype "
                         f"{NESTED_DTYPE}, got {meta.get('nested_blocksize')!r}, "
                         f"{meta.get('nested_dtype')!r}")
    offset = meta.get("nested_offset")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not np.isfinite(
            offset) or float(np.float32(offset)) != float(offset):
        raise ValueError(f"{p}{_QS}: nested_offset {offset!r} is not a finite float32 value")
    absmax2 = _tensor(sd, p + "weight.nested_absmax", torch.float32,
                      (-(-nblocks // NESTED_BLOCKSIZE),))
    _check_table(p + "weight.nested_quant_map",
                 _tensor(sd, p + "weight.nested_quant_map", torch.float32, (DYNAMIC_CODES,)),
                 ref.dynamic_map())
    state2 = nested_state(nblocks, absmax2, ops._table(NESTED_QUANT_TYPE, device))
    return torch.tensor(float(offset), dtype=torch.float32, device=device), state2


# ---- import: apply -------------------------------------------------------------------------------
def _quantized_prefixes(sd: dict) -> list[str]:
    out = []
    for k in sd:
        head, sep, _ = k.rpartition(_QS)
        if sep and (head == "" or head.endswith(".")):
            out.append(head[:-1] if head else "")
    if len(set(out)) != len(out):
        dup = sorted({p for p in out if out.count(p) > 1})
        raise ValueError(f"layers {dup} carry more than one quant_state entry")
    return out


def _layer_keys(sd: dict, prefix: str) -> set:
    p = f"{prefix}." if prefix else ""
    return {k for k in sd if k == p + "weight" or k.startswith(p + "weight.") or k == p + "bias"}


def from_bnb_state_dict(model: nn.Module, state_dict: dict, strict: bool = True,
                        compute_dtype: torch.dtype | None = None,
                        compute_dtypes: dict | None = None) -> nn.Module:
    """Load a bitsandbytes-layout state dict (``bnb`` ``Linear4bit`` layers, or
    ``to_bnb_state_dict`` output) into ``model``: each 4-bit layer's ``nn.Linear`` becomes a
    q4lab :class:`Linear4bit` (an existing ``Linear4bit`` gets the new bytes in place), every other
    entry is copied into the matching parameter or buffer. Everything (keys, shapes, dtypes, JSON,
    codebooks) is checked before anything changes; on any problem ``ValueError`` and ``model`` is
    untouched. ``strict``: missing or unexpected keys are errors. The compute dtype of new layers
    is ``compute_dtype``, else ``compute_dtypes[name]``, else the layer's existing one, else the
    stored weight dtype. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    plan, used = {}, set()
    for prefix in _quantized_prefixes(state_dict):
        plan[prefix] = _plan_layer(model, state_dict, prefix)
        used |= _layer_keys(state_dict, prefix)
    copies = _plan_copies(model, state_dict, set(plan), used, strict)
    for prefix, (module, packed, state, bias) in plan.items():
        dtype = compute_dtype or (compute_dtypes or {}).get(prefix) or getattr(
            module, "compute_dtype", None) or ops.DTYPE_OF_NAME[state.dtype]
        _apply_layer(model, prefix, module, packed, state, bias, dtype)
    with torch.no_grad():
        for target, value in copies:
            target.copy_(value)
    return model


def _plan_layer(model, sd, prefix):
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError as exc:
        raise ValueError(f"state dict has a 4-bit layer {prefix!r} that the model lacks") from exc
    if not isinstance(module, (nn.Linear, Linear4bit)):
        raise ValueError(f"{prefix!r} is a {type(module).__name__}, not a Linear layer")
    if not prefix and not isinstance(module, Linear4bit):
        raise ValueError("a bare nn.Linear cannot be replaced in place; pass its parent module, "
                         "or use q4lab.formats.bnb.parse_layer(state_dict, '') to build a "
                         "Linear4bit")
    packed, state, bias = parse_layer(sd, prefix)
    if tuple(state.shape) != (module.out_features, module.in_features):
        raise ValueError(f"layer {prefix!r}: stored weight shape {tuple(state.shape)} does not "
                         f"match the model's ({module.out_features}, {module.in_features})")
    if (module.bias is None) != (bias is None):
        have = "has" if module.bias is not None else "has no"
        raise ValueError(f"layer {prefix!r}: the model's layer {have} a bias but the state dict "
                         f"{'lacks' if bias is None else 'has'} '{prefix}.bias'")
    device = module.packed.device if isinstance(module, Linear4bit) else module.weight.device
    return module, packed.to(device), state.to(device), None if bias is None else bias.to(device)


def _plan_copies(model, sd, layers: set, used: set, strict: bool) -> list:
    """(target tensor, value) pairs for every non-4-bit entry, checked for shape and dtype."""
    own = {}
    for k, t in model.state_dict(keep_vars=True).items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in layers and leaf in ("weight", "bias", "packed"):
            continue
        own[k] = t
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own) - used)
    if strict and (missing or unexpected):
        raise ValueError(f"state dict does not match the model: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    copies = []
    for k in sorted(set(own) & set(sd)):
        target, value = own[k], sd[k]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{k!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
            raise ValueError(f"{k!r}: stored {value.dtype} {tuple(value.shape)} does not match "
                             f"the model's {target.dtype} {tuple(target.shape)}")
        copies.append((target.data if isinstance(target, nn.Parameter) else target, value))
    return copies


def _apply_layer(model, prefix, module, packed, state, bias, compute_dtype):
    if isinstance(module, Linear4bit):
        module.load_quantized(packed, state)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return
    layer = Linear4bit(module.in_features, module.out_features, packed, state, bias,
                       compute_dtype)
    set_submodule(model, prefix, layer)


def to_bnb_linear(layer: Linear4bit):
    """A real ``bitsandbytes.nn.Linear4bit`` holding exactly ``layer``'s bytes (device = the
    layer's; compute dtype = the layer's)."""
    import bitsandbytes as bnb

    sd = layer_state_dict(layer)
    s = layer.quant_state
    out = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            compute_dtype=layer.compute_dtype, quant_type=s.quant_type,
                            compress_statistics=s.nested, device="meta")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    device = layer.packed.device
    out.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=device,
                                                     module=out)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return out


def from_bnb_linear(bnb_layer, compute_dtype: torch.dtype | None = None) -> Linear4bit:
    """A q4lab :class:`Linear4bit` from a quantized ``bitsandbytes.nn.Linear4bit`` (its
    state dict, so the bytes are identical)."""
    sd = {k: v.detach() for k, v in bnb_layer.state_dict().items()}
    packed, state, bias = parse_layer(sd, "")
    out, inp = state.shape
    return Linear4bit(inp, out, packed, state.to(packed.device), bias,
                      compute_dtype or getattr(bnb_layer, "compute_dtype", None)
                      or ops.DTYPE_OF_NAME[state.dtype])


def to_bnb_model(model: nn.Module) -> nn.Module:
    """Replace every q4lab ``Linear4bit`` in ``model`` by a real ``bitsandbytes.nn.Linear4bit``
    with the same bytes (in place; returns ``model``). int4 layers are refused before any
    change."""
    names = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    for n in names:
        layer_state_dict(model.get_submodule(n))  # validates (int4 has no bnb equivalent)
    for n in names:
        set_submodule(model, n, to_bnb_linear(model.get_submodule(n)))
    return model


def from_bnb_model(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized ``bitsandbytes.nn.Linear4bit`` in ``model`` by a q4lab
    :class:`Linear4bit` holding the same bytes (in place; returns ``model``)."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers = {n: from_bnb_linear(model.get_submodule(n), compute_dtype) for n in names}
    for n, layer in layers.items():
        set_submodule(model, n, layer)
    return model
