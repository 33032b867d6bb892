"""LoRA adapter files both ways: PEFT adapter directories and q4lab's single safetensors file;
``save_adapters`` / ``load_adapters`` / ``read_adapters`` (``q4lab.save_adapters`` etc.).

Source: peft 0.21 ``PeftModel.save_pretrained``: ``adapter_config.json`` (a ``LoraConfig``:
``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``base_model_name_or_path``: what ``peft.AutoPeftModelForCausalLM`` loads the base from) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r x in) and
``.lora_B.weight`` (out x r) (``utils/save_and_load.py::get_peft_model_state_dict``). PEFT's forward
over a bnb 4-bit layer is ``base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r``
(``tuners/lora/bnb.py::Linear4bit``), the arithmetic of ``q4lab.LoRALinear4bit``; options that
change it (DoRA, rsLoRA, per-module ranks, trained biases, ``modules_to_save``) are refused by name.
q4lab's single file holds ``<module>.lora_A.weight`` / ``.lora_B.weight`` with r, alpha, dropout
and the target names in its metadata. Writes go through ``q4lab.formats.atomic``; a failed
``load_adapters`` leaves the model exactly as it was (docs/data-safety.md).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..lora import LoRALinear4bit, add_lora, check_lora_config, lora_layers
from ..quantize import set_submodule
from .atomic import ADAPTER_FILES, follow_umask, replace_file, write_directory
from .hf import layers_by_kind

ADAPTER_FORMAT = "q4lab.lora/1"
PEFT_PREFIX = "base_model.model."


def _target_names(model: nn.Module, names: list) -> list:
    """PEFT ``target_modules``: the short names (``q_proj``) when they match exactly the adapted
    layers among the model's linear layers (PEFT matches ``name == t or name.endswith('.' + t)``),
    else the full names."""
    quant, dense = layers_by_kind(model)
    candidates = set(quant) | set(dense)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    hit = {c for c in candidates if any(c == t or c.endswith("." + t) for t in short)}
    return short if hit == set(names) else sorted(names)


def base_model_name(model: nn.Module, given=None) -> str | None:
    """The base model's hub id or directory for ``adapter_config.json``: ``given`` when the caller
    names it, else what transformers recorded when the model was loaded (``model.name_or_path``,
    set from ``config._name_or_path`` by ``from_pretrained``, also ``q4lab.from_pretrained``), else
    None. ``""`` (a model built from a config) counts as unknown, as in peft's
    ``mapping_func.get_peft_model``."""
    if given is not None:
        if isinstance(given, os.PathLike):
            given = os.fspath(given)
        if not isinstance(given, str):
            raise TypeError(f"base_model_name_or_path={given!r} is a {type(given).__name__}; "
                            f"pass the base model's hub id or directory as a str (or None to "
                            f"take it from the model)")
        if not given.strip():
            raise ValueError("base_model_name_or_path is empty; pass the base model's hub id "
                             "or directory (or None to take it from the model)")
        return given
    for owner, attr in ((model, "name_or_path"), (getattr(model, "config", None), "_name_or_path")):
        name = getattr(owner, attr, None)
        if isinstance(name, os.PathLike):
            name = os.fspath(name)
        if isinstance(name, str) and name.strip():
            return name
    return None


def save_peft_adapters(model: nn.Module, directory, base_model_name_or_path=None) -> dict:
    """Write ``model``'s LoRA adapters as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors`` with PEFT's key names); returns the config written.
    ``base_model_name_or_path``: :func:`base_model_name` (the caller's, else the model's, else
    None); ``peft.AutoPeftModelForCausalLM`` loads the base from it."""
    from safetensors.torch import save_file

    layers = {n: m for n, m in lora_layers(model).items() if n}
    if not layers:
        raise ValueError("save_adapters: the model has no LoRA adapters (call q4lab.add_lora)")
    r, alpha = _common(layers, "r"), _common(layers, "alpha")
    dropout = max(float(getattr(m.lora_dropout, "p", 0.0)) for m in layers.values())
    causal = type(model).__name__.endswith("ForCausalLM")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
           "base_model_name_or_path": base_model_name(model, base_model_name_or_path), "r": r,
           "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
           "lora_dropout": dropout, "target_modules": _target_names(model, sorted(layers)),
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
           "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
           "layers_to_transform": None, "layers_pattern": None}
    tensors = {}
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight.detach().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = w
    with write_directory(directory, overwrite=True, owned=ADAPTER_FILES) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        follow_umask(tmp / "adapter_model.safetensors")
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def read_peft_adapters(directory) -> tuple[dict, int, float, float]:
    """Read a PEFT LoRA adapter directory: ({module: {"lora_A": A, "lora_B": B}}, r, alpha,
    dropout). Anything q4lab's LoRA layer does not compute (DoRA, rsLoRA, per-module ranks,
    trained biases, modules_to_save, embedding adapters) is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, st_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.is_file():
            raise FileNotFoundError(f"{directory} is not a PEFT adapter directory: {p.name} is "
                                    f"missing (pytorch .bin adapters are not read)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    _check_peft_config(cfg, cfg_path)
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"{st_path}: not readable as safetensors ({exc})") from exc
    modules = pair_adapter_tensors(tensors, st_path, PEFT_PREFIX)
    if not modules:
        raise ValueError(f"{st_path} holds no adapter weights")
    r, alpha, dropout = _lora_numbers(cfg["r"], cfg.get("lora_alpha", 8),
                                      cfg.get("lora_dropout") or 0.0, cfg_path,
                                      ("r", "lora_alpha", "lora_dropout"))
    return modules, r, alpha, dropout


def _check_peft_config(cfg, path) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported; q4lab "
                         f"loads LoRA adapters (peft_type 'LORA')")
    unsupported = [k for k, default in (("use_dora", False), ("use_rslora", False),
                                        ("fan_in_fan_out", False), ("modules_to_save", None),
                                        ("rank_pattern", {}), ("alpha_pattern", {}),
                                        ("layer_replication", None), ("use_qalora", False),
                                        ("trainable_token_indices", None))
                   if cfg.get(k) not in (default, None, {}, [], False)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r}")
    if unsupported:
        raise ValueError(f"{path}: adapter options q4lab's LoRA layer does not compute: "
                         f"{unsupported} (q4lab: y = base(x) + (lora_alpha/r) B A x)")
    if "r" not in cfg:
        raise ValueError(f"{path}: no 'r' (the LoRA rank); PEFT's LoraConfig writes it")


def _lora_numbers(r, alpha, dropout, path, keys) -> tuple[int, float, float]:
    """r, alpha, dropout as numbers, checked as ``add_lora`` checks them; ValueError naming the
    file and the key when one is not (e.g. ``lora_alpha: "sixteen"``)."""
    def number(value, key):
        if isinstance(value, str):
            try:
                return int(value) if key == keys[0] else float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {key}={value!r} is not a number; write it as a number "
                             f"(e.g. r: 8, lora_alpha: 16, lora_dropout: 0.05)")
        return value

    values = [number(v, k) for v, k in zip((r, alpha, dropout), keys)]
    try:
        return check_lora_config(*values)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (keys {', '.join(keys)})") from exc


def _common(layers: dict[str, LoRALinear4bit], attr: str):
    values = {getattr(m, attr) for m in layers.values()}
    if len(values) != 1:
        raise ValueError(f"adapter layers have different {attr}: {sorted(values)}; one adapter "
                         f"file holds one (r, alpha) configuration")
    return values.pop()


def adapter_metadata(layers: dict[str, LoRALinear4bit]) -> dict[str, str]:
    """The safetensors metadata: format tag, r, alpha, dropout, target names and module list."""
    dropout = {float(getattr(m.lora_dropout, "p", 0.0)) for m in layers.values()}
    return {"format": ADAPTER_FORMAT, "r": str(_common(layers, "r")),
            "alpha": repr(_common(layers, "alpha")), "dropout": repr(max(dropout)),
            "target_modules": json.dumps(sorted({n.rsplit(".", 1)[-1] for n in layers})),
            "modules": json.dumps(sorted(layers))}


def save_adapters(model: nn.Module, path, *, base_model_name_or_path=None) -> dict:
    """Write only the adapters. ``path`` not ending in ``.safetensors``: a PEFT adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``, keys
    ``base_model.model.<module>.lora_A.weight``) that ``peft.PeftModel.from_pretrained`` loads over
    the transformers + bitsandbytes base (``formats.peft.save_peft_adapters``); returns its config.
    ``path`` ending in ``.safetensors``: q4lab's single file, keys ``<module>.lora_A.weight``
    (r x in) and ``<module>.lora_B.weight`` (out x r) in the compute dtype, r, alpha, dropout and
    the target names in the file's metadata; returns the metadata. Both record the base model
    (``base_model_name_or_path``, in the single file's metadata only when known): the
    ``base_model_name_or_path`` given here, else the one transformers recorded on loading
    (``model.name_or_path``: ``q4lab.from_pretrained(path)`` and ``from_pretrained(hub_id)``
    set it), else None (:func:`base_model_name`)."""
    from safetensors.torch import save_file

    if not str(path).endswith(".safetensors"):
        return save_peft_adapters(model, path, base_model_name_or_path)
    base = base_model_name(model, base_model_name_or_path)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapters: the model has no LoRA adapters (call q4lab.add_lora)")
    tensors = {}
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{name}.{part}.weight"] = getattr(m, part).weight.detach().cpu().contiguous()
    meta = adapter_metadata(layers)
    if base is not None:
        meta["base_model_name_or_path"] = base
    with replace_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return meta


def read_adapters(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Read and check an adapter file: ({module: {"lora_A": A, "lora_B": B}}, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable safetensors adapter file ({exc})") from exc
    if meta.get("format") != ADAPTER_FORMAT or not {"r", "alpha"} <= meta.keys():
        raise ValueError(f"{path}: not a q4lab LoRA adapter file (metadata format="
                         f"{meta.get('format')!r}, expected {ADAPTER_FORMAT!r} with r and alpha)")
    _lora_numbers(meta["r"], meta["alpha"], meta.get("dropout", "0.0"), path,
                  ("r", "alpha", "dropout"))
    return pair_adapter_tensors(tensors, path), meta


def pair_adapter_tensors(tensors: dict, path,
                         prefix: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"lora_A": A, "lora_B": B}} from ``<prefix><module>.lora_A.weight`` /
    ``.lora_B.weight`` keys (q4lab's adapter files, and PEFT's with prefix
    ``base_model.model.``); any other key, or a module with only one of the two, is an error."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, dot, part = key.removeprefix(prefix).rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: unexpected key {key!r} (expected <module>.lora_A.weight "
                             f"or <module>.lora_B.weight)")
        modules.setdefault(name, {})["lora_" + part[0]] = t
    unpaired = sorted(n for n, d in modules.items() if len(d) != 2)
    if unpaired:
        raise ValueError(f"{path}: modules with only one of lora_A / lora_B: {unpaired}")
    return modules


def _check_config(layer: LoRALinear4bit, name: str, r: int, alpha: float, path) -> None:
    if layer.r != r or layer.alpha != alpha:
        raise ValueError(f"{path}: adapter config r={r}, alpha={alpha:g} does not match the "
                         f"model's {name} (r={layer.r}, alpha={layer.alpha:g})")


def _check_shape(name: str, part: str, got: torch.Tensor, want: torch.Tensor, path) -> None:
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"{path}: {name}.{part}.weight has shape {tuple(got.shape)} but the "
                         f"model's adapter needs {tuple(want.shape)}")


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Load adapters into ``model`` (in place; returns it): a PEFT LoRA adapter directory (written
    by PEFT's ``save_pretrained`` or by :func:`save_adapters`; :func:`read_peft_adapters`) or a
    q4lab single adapter file.

    If the model has no adapters yet, they are added first (``add_lora`` on exactly the modules
    named in the file, with its r/alpha/dropout). Otherwise the file must name the same modules
    with the same r and alpha, and every tensor must have the adapter's shape: any mismatch is a
    ValueError listing what differs. All or nothing: when loading fails the model is exactly as
    before (no wrappers added, the same trainable parameters, the same adapter weights). A dtype
    different from the adapters' is converted, with a warning if that conversion is not exact."""
    if Path(path).is_dir():
        modules, r, alpha, dropout = read_peft_adapters(path)
    else:
        modules, meta = read_adapters(path)
        r, alpha, dropout = _lora_numbers(meta["r"], meta["alpha"], meta.get("dropout", "0.0"),
                                          path, ("r", "alpha", "dropout"))
    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    added: list = []
    saved: list = []
    try:
        if not lora_layers(model):
            model = add_lora(model, r, alpha, dropout, target_modules=sorted(modules))
            added = sorted(lora_layers(model))
        layers = lora_layers(model)
        _check_adapters(layers, modules, r, alpha, path)
        with torch.no_grad():
            for name, layer in layers.items():
                for part, t in modules[name].items():
                    param = getattr(layer, part).weight
                    saved.append((param, param.detach().clone()))
                    param.copy_(t)
                    if t.dtype != param.dtype and not torch.equal(param.to(t.dtype), t):
                        warnings.warn(f"{path}: {name}.{part} converted from {t.dtype} to "
                                      f"{param.dtype} with rounding", RuntimeWarning,
                                      stacklevel=2)
    except BaseException:
        with torch.no_grad():
            for param, old in saved:
                param.copy_(old)
        for name in added:
            if name:
                set_submodule(model, name, model.get_submodule(name).base)
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        raise
    return model


def _check_adapters(layers: dict, modules: dict, r: int, alpha: float, path) -> None:
    missing, unexpected = sorted(set(layers) - set(modules)), sorted(set(modules) - set(layers))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter modules do not match the model: missing from the file "
                         f"{missing[:5]}, not adapters in the model {unexpected[:5]}")
    for name, layer in layers.items():  # check everything before touching any weight
        _check_config(layer, name, r, alpha, path)
        for part, t in modules[name].items():
            _check_shape(name, part, t, getattr(layer, part).weight, path)
