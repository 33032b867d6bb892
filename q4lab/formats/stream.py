"""``quantize_checkpoint``: quantize a (sharded) safetensors checkpoint directory without loading
the model, one tensor at a time, into the directory ``q4lab.save_pretrained`` writes.

What is quantized is decided exactly as ``q4lab.quantize_model`` decides it on the loaded model (the
walk of transformers' ``replace_with_bnb_linear``: every ``nn.Linear`` not matched by
``Q4Config.skip_modules``, not a LoRA layer, with at least ``min_numel`` weights), on a transformers
model built from ``config.json`` on the meta device (no memory). Each of those weights is read
(``checkpoint.read_tensor``), quantized by ``q4lab.quantize_4bit`` with the config's settings and
written in bitsandbytes' keys (``q4lab.to_bnb_state_dict``); every other tensor (embeddings, norms,
skipped layers, biases) is copied byte for byte without being loaded. So the output is
byte-identical to ``quantize_model`` + ``save_pretrained`` on the model loaded in the checkpoint's
own dtype. Peak memory: one source tensor and its 4-bit result (plus 16 MiB copy buffers); the
output goes to disk shard by shard (``checkpoint.ShardWriter``).

Everything that can be checked before writing is checked first (every shard present and whole,
index and shards agreeing, every weight to quantize present, floating point and of the layer's
shape); the output is built in a temporary directory next to ``destination`` and renamed at the
end, and removed on any error, so a failure never leaves a half-written destination.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .shards import ShardWriter, commit_directory, inventory, parse_size, read_tensor
from .hf import _tmp_dir, bnb_quantization_config, empty_model, tied_targets

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def linear_targets(model: nn.Module, cfg) -> tuple[list, list]:
    """(names ``quantize_model`` would quantize, names of the other ``nn.Linear`` layers), by the
    rules of ``quantize_model``; works on a meta-device model (no weights needed)."""
    targets, dense = [], []
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, nn.Linear) or not name:
            continue
        lora = any(p.startswith("lora_") for p in name.split("."))
        if cfg.skips(name) or lora or module.weight.numel() < cfg.min_numel:
            dense.append(name)
        else:
            targets.append(name)
    return targets, dense


def _config(source: Path):
    from transformers import AutoConfig

    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; quantize_checkpoint reads a "
                                f"transformers checkpoint directory")
    config = AutoConfig.from_pretrained(str(source))
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else type(qc).__name__
        raise ValueError(f"{source} is already quantized (quant_method {method!r}); "
                         f"quantize_checkpoint reads full-precision checkpoints")
    return config


def _plan(model, entries: dict, cfg, source) -> tuple[dict, list, torch.dtype]:
    """{weight key: layer name} to quantize, the other Linear names, the compute dtype; raises
    ValueError before anything is written if a weight is missing, not float, or misshapen."""
    targets, dense = linear_targets(model, cfg)
    tied = tied_targets(model)
    plan = {}
    for name in targets:
        key = f"{name}.weight"
        e = entries.get(key)
        if e is None:
            why = (f"; it is tied to another tensor (tie_word_embeddings): add {name!r} to "
                   f"skip_modules" if key in tied else
                   "; quantize_checkpoint needs checkpoint keys equal to the model's parameter "
                   "names")
            raise ValueError(f"{source}: no tensor {key!r} for Linear layer {name!r}{why}")
        if e.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{source}: {key!r} ({e.path.name}) is {e.dtype} where the Linear "
                             f"layer {name!r} needs a float32/float16/bfloat16 weight")
        module = model.get_submodule(name)
        if e.shape != (module.out_features, module.in_features):
            raise ValueError(f"{source}: {key!r} has shape {e.shape}, the Linear layer "
                             f"{name!r} needs ({module.out_features}, {module.in_features})")
        plan[key] = name
    if not plan:
        raise ValueError(f"{source}: no Linear layer to quantize with {cfg}")
    dtypes = {cfg.compute_dtype or entries[k].dtype for k in plan}
    if len(dtypes) != 1:
        raise ValueError(f"{source}: the weights have dtypes {sorted(map(str, dtypes))} and "
                         f"compute_dtype=None; set Q4Config.compute_dtype (the config holds one)")
    return plan, dense, dtypes.pop()


def _quantized_group(weight: torch.Tensor, name: str, cfg, compute_dtype) -> dict:
    from ..ops import quantize_4bit
    from .bnb import to_bnb_state_dict
    from ..nn import Linear4bit

    try:
        packed, state = quantize_4bit(weight, cfg.blocksize, cfg.quant_type, cfg.double_quant,
                                      cfg.backend)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from exc
    layer = Linear4bit(weight.shape[1], weight.shape[0], packed, state, None, compute_dtype)
    return {f"{name}.{k}": v for k, v in to_bnb_state_dict(layer).items()}


def _generation_config(source: Path, model, tmp: Path) -> None:
    """The generation_config.json the loaded model would be saved with, read as transformers'
    ``GenerationMixin.adjust_generation_fn`` reads it: the source's file, or if there is none,
    the generation settings in config.json (``_from_model_config``)."""
    if not model.can_generate():
        return
    from transformers import GenerationConfig

    if (source / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(str(source))
    else:
        gen = GenerationConfig.from_pretrained(str(source), config_file_name="config.json",
                                               _from_model_config=True)
    gen.save_pretrained(tmp)


def quantize_checkpoint(source, destination, config=None, *, max_shard_size="5GB",
                        overwrite: bool = False, progress: bool = True) -> Path:
    """Quantize the safetensors checkpoint directory ``source`` (``model.safetensors`` or shards +
    index, with ``config.json``) into ``destination`` tensor by tensor, never holding the model.
    ``config``: a ``q4lab.Q4Config`` (default QLoRA's). The result is the directory
    ``q4lab.save_pretrained`` writes for ``quantize_model(loaded model, config)``, byte for byte,
    plus the source's other files (tokenizer, generation config). ``destination`` must not exist
    unless ``overwrite=True``. Returns ``destination``."""
    from ..nn import Q4Config

    cfg = Q4Config() if config is None else config
    if not isinstance(cfg, Q4Config):
        raise TypeError(f"config must be a q4lab.Q4Config, got {type(cfg).__name__}")
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise FileNotFoundError(f"source {source} is not a directory")
    if destination.resolve() == source.resolve():
        raise ValueError("destination must differ from source")
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True to replace it")
    max_bytes = parse_size(max_shard_size)
    entries, _ = inventory(source)
    hf_config = _config(source)
    model = empty_model(hf_config)
    plan, dense, compute_dtype = _plan(model, entries, cfg, source)
    hf_config.architectures = [type(model).__name__]  # as save_pretrained of the loaded model
    hf_config.quantization_config = bnb_quantization_config(cfg.quant_type, cfg.double_quant,
                                                            compute_dtype, dense)
    tmp = _tmp_dir(destination)
    try:
        writer = ShardWriter(tmp, max_bytes)
        total = sum(e.nbytes for e in entries.values())
        with tqdm(total=total, desc="quantizing checkpoint", unit="B", unit_scale=True,
                  disable=not progress) as bar:
            for key in sorted(entries):  # save_pretrained's order: the same shards
                e = entries[key]
                if key in plan:
                    weight = read_tensor(e)
                    writer.add(_quantized_group(weight, plan[key], cfg, compute_dtype))
                    del weight
                else:
                    writer.add({key: e})
                bar.update(e.nbytes)
        writer.finish()
        hf_config.save_pretrained(tmp)
        _generation_config(source, model, tmp)
        for p in sorted(source.iterdir()):
            if p.is_file() and p.name not in ("config.json", "model.safetensors.index.json",
                                              "generation_config.json") \
                    and not p.name.endswith(_NOT_COPIED):
                shutil.copy2(p, tmp / p.name)
        commit_directory(tmp, destination, replace="replace" if overwrite else "error")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination
