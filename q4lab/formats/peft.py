"""PEFT LoRA adapter directories both ways: ``save_peft_adapters`` / ``read_peft_adapters``
(``q4lab.save_adapters`` / ``q4lab.load_adapters`` with a directory).

Source: peft 0.21 ``PeftModel.save_pretrained``: ``adapter_config.json`` (a ``LoraConfig``:
``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r x in) and
``.lora_B.weight`` (out x r) (``utils/save_and_load.py::get_peft_model_state_dict``). PEFT's forward
over a bnb 4-bit layer is ``base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r``
(``tuners/lora/bnb.py::Linear4bit``), the arithmetic of ``q4lab.LoRALinear4bit``; options that
change it (DoRA, rsLoRA, per-module ranks, trained biases, ``modules_to_save``) are refused by name.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .hf import _layers

PEFT_PREFIX = "base_model.model."


def _target_names(model: nn.Module, names: list) -> list:
    """PEFT ``target_modules``: the short names (``q_proj``) when they match exactly the adapted
    layers among the model's linear layers (PEFT matches ``name == t or name.endswith('.' + t)``),
    else the full names."""
    quant, dense = _layers(model)
    candidates = set(quant) | set(dense)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    hit = {c for c in candidates if any(c == t or c.endswith("." + t) for t in short)}
    return short if hit == set(names) else sorted(names)


def save_peft_adapters(model: nn.Module, directory) -> dict:
    """Write ``model``'s LoRA adapters as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors`` with PEFT's key names); returns the config written."""
    from safetensors.torch import save_file

    from ..lora import _common, lora_layers

    layers = {n: m for n, m in lora_layers(model).items() if n}
    if not layers:
        raise ValueError("save_adapters: the model has no LoRA adapters (call q4lab.add_lora)")
    r, alpha = _common(layers, "r"), _common(layers, "alpha")
    dropout = max(float(getattr(m.lora_dropout, "p", 0.0)) for m in layers.values())
    causal = type(model).__name__.endswith("ForCausalLM")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
           "base_model_name_or_path": None, "r": r,
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True)
                                                   + "\n")
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
    from ..lora import pair_adapter_tensors

    modules = pair_adapter_tensors(tensors, st_path, PEFT_PREFIX)
    if not modules:
        raise ValueError(f"{st_path} holds no adapter weights")
    return modules, int(cfg["r"]), float(cfg.get("lora_alpha", 8)), \
        float(cfg.get("lora_dropout") or 0.0)


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
    if isinstance(cfg.get("r"), bool) or not isinstance(cfg.get("r"), int):
        raise ValueError(f"{path}: r must be an integer, got {cfg.get('r')!r}")

