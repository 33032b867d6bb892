"""transformers directories both ways: ``save_pretrained`` / ``from_pretrained``.

Sources (transformers 5.24, bitsandbytes 0.50.2, read from their code):
- A bitsandbytes 4-bit checkpoint directory is what ``PreTrainedModel.save_pretrained`` writes for a
  model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``: ``config.json`` whose
  ``quantization_config`` is ``BitsAndBytesConfig.to_dict()`` (``quant_method: "bitsandbytes"``,
  ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``,
  ``bnb_4bit_quant_storage``, ``llm_int8_skip_modules``), and safetensors whose 4-bit layers carry
  bnb's keys ``<layer>.weight`` (packed uint8, ``(n/2, 1)``), ``.weight.absmax``,
  ``.weight.quant_map``, ``.weight.nested_absmax``, ``.weight.nested_quant_map`` and
  ``.weight.quant_state.bitsandbytes__<nf4|fp4>`` (``quantizers/quantizer_bnb_4bit.py::
  serialized_names``; bnb ``QuantState.as_dict(packed=True)``; q4lab's ``interop`` module writes
  and checks them, docs/bitsandbytes.md lists them). Loading, transformers replaces every
  ``nn.Linear`` not matched by ``llm_int8_skip_modules`` (``quantizers_utils.py::
  should_convert_module``: a name prefix, a regex or a suffix) with ``bnb.nn.Linear4bit`` and
  rebuilds each weight with ``Params4bit.from_prequantized`` (``integrations/bitsandbytes.py``).
  So ``save_pretrained`` lists every full-precision ``nn.Linear`` by full name there: with a list
  given, transformers adds no default skips (``HfQuantizer.get_modules_to_not_convert``).
- ``from_pretrained`` reads the same directory WITHOUT bitsandbytes: the transformers model is
  built with empty (meta) parameters (``accelerate.init_empty_weights``), each 4-bit layer becomes
  a ``q4lab.Linear4bit`` holding the file's bytes, everything else is assigned from the file.
- Logits: bitsandbytes computes such a layer as dequantize + matmul, as q4lab does, so float32
  logits are identical; except that bnb 0.50.2 on a CPU with AVX512-BF16 repacks each weight on
  its first eval-mode forward and rounds the absmax to bfloat16 (``nn/modules.py::
  Linear4bit.forward`` -> ``functional.py::_convert_weight_packed_for_cpu``), after which its
  logits differ by that rounding (``layer.support_avx512bf16_for_cpu = False`` turns it off).
PEFT adapter directories are in ``q4lab.formats.peft``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..storage import storage_dtype

_QS = ".weight.quant_state.bitsandbytes__"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ---- the quantization_config transformers reads --------------------------------------------------
def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
                            skip_modules, quant_storage: str = "uint8") -> dict:
    """``BitsAndBytesConfig(load_in_4bit=True, ...).to_dict()`` as transformers 5.24 writes it into
    ``config.json`` (same keys, same values; the test suite compares it with the real one)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type {quant_type!r} has no bitsandbytes equivalent (bnb stores "
                         f"nf4 and fp4); re-quantize with quant_type='nf4' to save")
    return {"_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES[compute_dtype],
            "bnb_4bit_quant_storage": quant_storage, "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": bool(double_quant),
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": sorted(skip_modules), "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def check_quantization_config(qc, where) -> dict:
    """The ``quantization_config`` of a checkpoint q4lab can open, or ValueError naming what is not
    supported (no quantization, another method, 8-bit, a storage dtype that is not a torch
    dtype). ``bnb_4bit_quant_storage`` other than uint8 (FSDP-QLoRA checkpoints: the packed
    bytes viewed as e.g. bfloat16, shape (n/4, 1)) is read byte for byte."""
    if qc is None:
        raise ValueError(f"{where}: config.json has no quantization_config, so this is not a "
                         f"4-bit checkpoint; load it with transformers and quantize it with "
                         f"q4lab.quantize_model, or stream it with q4lab.quantize_checkpoint")
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be a JSON object, got {qc!r}")
    _check_field_types(qc, where)
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{where}: quant_method {method!r} is not supported; q4lab opens "
                         f"bitsandbytes 4-bit (NF4/FP4) checkpoints only")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{where}: this is a bitsandbytes 8-bit (LLM.int8, Linear8bitLt) "
                         f"checkpoint; 8-bit checkpoints are not supported, q4lab opens 4-bit "
                         f"NF4/FP4 ones")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ValueError(f"{where}: quantization_config has neither load_in_4bit nor "
                         f"load_in_8bit set; not a bitsandbytes 4-bit checkpoint")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    try:
        storage_dtype(str(storage))
    except TypeError as exc:
        raise ValueError(f"{where}: bnb_4bit_quant_storage {storage!r} is not a torch dtype "
                         f"that can hold packed 4-bit bytes ({exc})") from exc
    return qc


_FIELD_TYPES = {"quant_method": (str,), "load_in_4bit": (bool,), "_load_in_4bit": (bool,),
                "load_in_8bit": (bool,), "_load_in_8bit": (bool,),
                "bnb_4bit_use_double_quant": (bool,), "bnb_4bit_quant_type": (str,),
                "bnb_4bit_compute_dtype": (str,), "bnb_4bit_quant_storage": (str,),
                "llm_int8_skip_modules": (list,)}


def _check_field_types(qc: dict, where) -> None:
    """Each field transformers' ``BitsAndBytesConfig`` defines has its JSON type (a string,
    ``true``/``false``, a list of names) or is null; else ValueError naming it, instead of an
    AttributeError or TypeError later."""
    for key, types in _FIELD_TYPES.items():
        value = qc.get(key)
        if value is not None and not isinstance(value, types):
            kind = {bool: "true or false", str: "a string", list: "a list of module names"}
            raise ValueError(f"{where}: quantization_config.{key} = {value!r} must be "
                             f"{kind[types[0]]} (as transformers' BitsAndBytesConfig writes it); "
                             f"fix config.json")
    if qc.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise ValueError(f"{where}: bnb_4bit_quant_type {qc['bnb_4bit_quant_type']!r} is not "
                         f"'nf4' or 'fp4', the 4-bit types bitsandbytes stores")
    skip = qc.get("llm_int8_skip_modules") or []
    if not all(isinstance(n, str) for n in skip):
        raise ValueError(f"{where}: quantization_config.llm_int8_skip_modules must list module "
                         f"names (strings), got {skip!r}")


# ---- building transformers models without loading weights ----------------------------------------
def model_class(config):
    """The transformers class named by ``config.architectures`` (else AutoModelForCausalLM's, else
    AutoModel's)."""
    import transformers

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise ValueError(f"transformers has no model class for config {type(config).__name__} "
                     f"(architectures={getattr(config, 'architectures', None)})")


def empty_model(config, buffers: bool = False) -> nn.Module:
    """A transformers model of ``config`` whose parameters are on the meta device (no memory);
    ``buffers=True`` keeps buffers real (rotary tables are computed in ``__init__`` and are not
    in the checkpoint: ``accelerate.init_empty_weights(include_buffers=False)``)."""
    cls = model_class(config)
    if buffers:
        try:
            from accelerate import init_empty_weights
        except ImportError as exc:
            raise ImportError("q4lab.from_pretrained needs accelerate (pip install accelerate, "
                              "part of q4lab[models])") from exc
        with init_empty_weights(include_buffers=False):
            return cls(config).eval()
    with torch.device("meta"):
        return cls(config).eval()


def tied_targets(model: nn.Module) -> set:
    """Parameter names transformers re-ties on load instead of reading them (``lm_head.weight``
    of a model with ``tie_word_embeddings``): ``all_tied_weights_keys`` (5.x) or
    ``_tied_weights_keys`` (4.x)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if keys is None:
        keys = getattr(model, "_tied_weights_keys", None) or ()
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        return set()
    return set(keys)


# ---- save_pretrained ---------------------------------------------------------------------------
def _unwrapped_state_dict(model: nn.Module) -> dict:
    """``to_bnb_state_dict(model)`` with every LoRA wrapper replaced by its 4-bit base (the
    adapters are saved separately: ``q4lab.save_adapters``)."""
    from .bnb import to_bnb_state_dict
    from ..quantize import is_adapter_wrapper, linear_layers

    state = to_bnb_state_dict(model)
    wrappers = [n for n, m in linear_layers(model, every_name=False).items()
                if is_adapter_wrapper(m)]
    if not wrappers:
        return state
    out = {}
    for key, t in state.items():
        for w in wrappers:
            if key.startswith(w + ".base."):
                key = w + "." + key[len(w) + 6:]
                break
            if key.startswith(w + ".lora_"):
                key = None
                break
        if key is not None:
            out[key] = t
    return out


def layers_by_kind(model: nn.Module) -> tuple[dict, list]:
    """({name: Linear4bit} with LoRA bases under their wrapper's name, [names of the
    full-precision nn.Linear layers]), from ``q4lab.quantize.linear_layers``."""
    from ..nn import Linear4bit
    from ..quantize import is_adapter_wrapper, linear_layers

    quant, dense = {}, []
    for name, m in linear_layers(model).items():
        if is_adapter_wrapper(m):
            quant[name] = m.base
        elif isinstance(m, Linear4bit):
            quant[name] = m
        else:
            dense.append(name)
    return quant, dense


def _one(values: dict, what: str):
    kinds = sorted({str(v) for v in values.values()})
    if len(kinds) != 1:
        by = {k: sorted(n for n, v in values.items() if str(v) == k)[:3] for k in kinds}
        raise ValueError(f"the 4-bit layers use different {what} ({by}); a transformers "
                         f"quantization_config holds one value, re-quantize with a single one")
    return next(iter(values.values()))


def _quant_config_of(quant: dict, dense: list) -> dict:
    states = {n: m.quant_state for n, m in quant.items()}
    return bnb_quantization_config(
        _one({n: s.quant_type for n, s in states.items()}, "quant types"),
        _one({n: s.nested for n, s in states.items()}, "double-quant settings"),
        _one({n: m.compute_dtype for n, m in quant.items()}, "compute dtypes"), dense,
        str(_one({n: m.quant_storage for n, m in quant.items()}, "storage dtypes"))
        .removeprefix("torch."))


def _dedupe_tied(model: nn.Module, state: dict) -> dict:
    """Drop the tied names transformers re-ties on load (``lm_head.weight`` when it is the
    embedding's tensor), as its ``save_pretrained`` does; other shared tensors are kept."""
    targets = tied_targets(model)

    def ident(t):
        return t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape)

    kept = {ident(t) for k, t in state.items() if k not in targets and t.numel()}
    return {k: t for k, t in state.items() if not (k in targets and ident(t) in kept)}


def save_pretrained(model: nn.Module, directory, tokenizer=None, max_shard_size="5GB",
                    progress: bool = True) -> Path:
    """Write a q4lab-quantized transformers model as a transformers + bitsandbytes 4-bit directory:
    ``config.json`` (with transformers' bitsandbytes ``quantization_config``), safetensors in
    bitsandbytes' keys (sharded above ``max_shard_size``, with ``model.safetensors.index.json``),
    ``generation_config.json`` and the tokenizer's files when given. LoRA adapters are not part of
    it (their 4-bit bases are): save them with ``q4lab.save_adapters(model, directory)``.
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it with bitsandbytes
    installed, ``q4lab.from_pretrained(directory)`` without. Written transactionally
    (``q4lab.formats.atomic.write_directory``, docs/data-safety.md): into an existing directory
    the old model's files (weights, shards, index, configs) are replaced, the user's other files
    kept, and on any failure the directory is left as it was. Returns the directory."""
    from .atomic import write_directory
    from .shards import ShardWriter, parse_size

    config = getattr(model, "config", None)
    if not (isinstance(model, nn.Module) and hasattr(config, "to_dict")
            and hasattr(config, "save_pretrained")):
        raise TypeError(f"save_pretrained writes a transformers directory and needs a transformers "
                        f"model (with .config), got {type(model).__name__}; for any nn.Module "
                        f"use q4lab.save(model, path)")
    quant, dense = layers_by_kind(model)
    if not quant:
        raise ValueError("save_pretrained: the model has no 4-bit layers; quantize it first "
                         "(q4lab.quantize_model)")
    qc = _quant_config_of(quant, dense)
    state = _dedupe_tied(model, _unwrapped_state_dict(model))
    config = copy.deepcopy(config)
    if tied_targets(model) & {f"{n}.weight" for n in quant}:
        config.tie_word_embeddings = False  # a 4-bit output layer is no longer the embedding
    config.quantization_config = qc
    config.architectures = [type(model).__name__]  # as transformers' save_pretrained sets it
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer (with save_pretrained), got "
                        f"{type(tokenizer).__name__}; pass tokenizer=None to save without one")
    max_bytes = parse_size(max_shard_size)
    directory = Path(directory)
    with write_directory(directory, overwrite=True) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        from tqdm.auto import tqdm

        with tqdm(total=sum(t.numel() * t.element_size() for t in state.values()), unit="B",
                  unit_scale=True, desc="writing 4-bit checkpoint", disable=not progress) as bar:
            for group in _groups(state, quant):
                writer.add(group)
                bar.update(sum(t.numel() * t.element_size() for t in group.values()))
        writer.finish()
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return directory


def _groups(state: dict, quant: dict):
    """One group per 4-bit layer (its ``weight*`` entries stay in one shard), one per other
    tensor, in order of their first key: the order ``q4lab.quantize_checkpoint`` writes, so both
    produce the same shards byte for byte."""
    weights = {f"{n}.weight" for n in quant}
    groups: dict = {}
    for key, t in state.items():
        head = key[:key.index(".weight.") + 7] if ".weight." in key else key
        groups.setdefault(head if head in weights else key, {})[key] = t
    for name in sorted(groups):
        yield groups[name]


# ---- from_pretrained -----------------------------------------------------------------------------
def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory (q4lab.from_pretrained opens a "
                                f"local transformers checkpoint directory)")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; not a transformers checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def from_pretrained(directory, compute_dtype: torch.dtype | None = None, progress: bool = True):
    """Open a bitsandbytes 4-bit transformers directory (what transformers + bitsandbytes'
    ``save_pretrained`` writes, or :func:`save_pretrained`) as a transformers model whose 4-bit
    layers are ``q4lab.Linear4bit`` holding the file's bytes unchanged; bitsandbytes is not needed.
    Compute dtype: ``compute_dtype``, else the file's ``bnb_4bit_compute_dtype``. Every other
    tensor is assigned from the file as stored. 8-bit checkpoints, other quantization methods and
    layouts q4lab cannot represent raise ValueError naming what is unsupported."""
    from .shards import inventory, read_tensor
    from .bnb import parse_layer
    from ..nn import Linear4bit
    from ..ops import DTYPE_OF_NAME

    from .atomic import recover

    directory = Path(directory)
    recover(directory)  # a swap a killed writer left half done is rolled back first
    raw = _read_config(directory)
    qc = check_quantization_config(raw.get("quantization_config"), directory)
    if compute_dtype is None:
        compute_dtype = DTYPE_OF_NAME.get(str(qc.get("bnb_4bit_compute_dtype") or "float32")
                                          .removeprefix("torch."))
        if compute_dtype is None:
            raise ValueError(f"{directory}: bnb_4bit_compute_dtype "
                             f"{qc.get('bnb_4bit_compute_dtype')!r} is not float32, float16 or "
                             f"bfloat16")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ValueError(f"{directory / 'config.json'}: transformers cannot build a config from "
                         f"it ({' '.join(str(exc).split())[:300]}); fix or replace the file") \
            from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    entries, _ = inventory(directory)
    from tqdm.auto import tqdm

    state = {}
    with tqdm(total=sum(e.nbytes for e in entries.values()), desc="reading 4-bit checkpoint",
              unit="B", unit_scale=True, disable=not progress) as bar:
        for k, e in entries.items():
            state[k] = read_tensor(e)
            bar.update(e.nbytes)
    prefixes = sorted({k[:k.index(_QS)] for k in state if _QS in k})
    if not prefixes:
        raise ValueError(f"{directory}: config.json says 4-bit but no tensor carries a "
                         f"'*{_QS}<nf4|fp4>' entry")
    model = empty_model(config, buffers=True)
    used = set()
    for prefix in prefixes:
        try:
            packed, qstate, bias = parse_layer(state, prefix)
        except ValueError as exc:
            raise ValueError(f"{directory}: {exc}") from exc
        if packed.dtype != storage_dtype(str(qc.get("bnb_4bit_quant_storage", "uint8"))):
            raise ValueError(f"{directory}: config.json says bnb_4bit_quant_storage "
                             f"{qc.get('bnb_4bit_quant_storage', 'uint8')!r} but {prefix}.weight "
                             f"is stored as {str(packed.dtype).removeprefix('torch.')}; the "
                             f"directory is inconsistent (fix quantization_config)")
        _module_for(model, prefix, qstate.shape, directory)
        model.set_submodule(prefix, Linear4bit(qstate.shape[1], qstate.shape[0], packed, qstate,
                                               bias, compute_dtype))
        used |= {k for k in state if k == prefix + ".weight" or k.startswith(prefix + ".weight.")
                 or k == prefix + ".bias"}
    _assign_rest(model, {k: v for k, v in state.items() if k not in used}, directory)
    from ..decode_groups import link_siblings

    link_siblings(model)  # q/k/v and gate/up decode as one call each (same bytes)
    return model.eval()


def _module_for(model, prefix, shape, directory) -> None:
    """Check that ``prefix`` names a Linear (or Conv1D) layer of the stored weight's shape."""
    try:
        module = model.get_submodule(prefix)
    except AttributeError as exc:
        raise ValueError(f"{directory}: the checkpoint has a 4-bit layer {prefix!r} that "
                         f"{type(model).__name__} does not have") from exc
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        want = (module.out_features, module.in_features)
    elif kind == "Conv1D":  # GPT-2 style: weight (in, out); bnb stores it transposed, as Linear
        want = tuple(module.weight.shape[::-1])
    else:
        raise ValueError(f"{directory}: {prefix!r} is a {kind}; q4lab puts 4-bit weights only "
                         f"in Linear (or transformers Conv1D) layers")
    if tuple(shape) != want:
        raise ValueError(f"{directory}: layer {prefix!r} stores a {tuple(shape)} weight but the "
                         f"model's layer is {want}")


def _assign_rest(model, state: dict, directory) -> None:
    own = model.state_dict(keep_vars=True)
    targets = tied_targets(model)
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{directory}: tensors the model has no place for (an unsupported "
                         f"layout?): {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{directory}: {k!r} has shape {tuple(v.shape)}, the model's is "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if targets:
        model.tie_weights()
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ValueError(f"{directory}: the checkpoint lacks {left[:6]}"
                         f"{' ...' if len(left) > 6 else ''}")
