"""``quantize_checkpoint``: quantize a (sharded) safetensors checkpoint directory without loading
the model, one tensor at a time, into the directory ``q4lab.save_pretrained`` writes.

What is quantized is decided by the function ``q4lab.quantize_model`` uses on the loaded model
(``q4lab.quantize.quantize_targets``, the walk of transformers' ``replace_with_bnb_linear``: every
``nn.Linear`` not matched by ``Q4Config.skip_modules``, not a LoRA layer, with at least
``min_numel`` weights), on a transformers model built from ``config.json`` on the meta device.
Each of those weights is read (``shards.read_tensor``), quantized by ``q4lab.quantize_4bit`` with
the config's settings and written in bitsandbytes' keys (``q4lab.to_bnb_state_dict``); every other
tensor (embeddings, norms, skipped layers, biases) is copied byte for byte without being loaded. So
the output is byte-identical to ``quantize_model`` + ``save_pretrained`` on the model loaded in the
checkpoint's own dtype. Peak memory: one source tensor and its 4-bit result (plus 16 MiB copy
buffers); the output goes to disk shard by shard (``shards.ShardWriter``).

Everything that can be checked before writing is checked first (every shard present and whole,
index and shards agreeing, every weight to quantize present, floating point and of the layer's
shape); the output is written through ``q4lab.formats.atomic.write_directory``, so a failure, a
SIGTERM or a SIGKILL never leaves a half-written destination (docs/data-safety.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..quantize import quantize_targets
from .atomic import check_separate, is_temporary, recover, write_directory
from .hf import bnb_quantization_config, empty_model, tied_targets
from .shards import ShardWriter, inventory, parse_size, read_tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def _config(source: Path):
    from transformers import AutoConfig

    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; quantize_checkpoint reads a "
                                f"transformers checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(str(source))
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise ValueError(f"{source / 'config.json'} is not a transformers config that q4lab can "
                         f"read ({_one_line(exc)}); fix or replace it (it must be the JSON "
                         f"transformers' save_pretrained writes, with a known model_type)") from exc
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else type(qc).__name__
        raise ValueError(f"{source} is already quantized (quant_method {method!r}); "
                         f"quantize_checkpoint reads full-precision checkpoints")
    return config


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _plan(model, entries: dict, cfg, source) -> tuple[dict, list, torch.dtype]:
    """{weight key: layer name} to quantize, the other Linear names, the compute dtype; raises
    ValueError before anything is written if a weight is missing, not float, or misshapen."""
    targets, dense = quantize_targets(model, cfg)
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
    (or be empty) unless ``overwrite=True``, and must not be ``source``, inside it or contain it.
    Written transactionally (``q4lab.formats.atomic.write_directory``, docs/data-safety.md): the
    old model's files in ``destination`` are replaced, the user's other files kept, and on any
    failure or kill it holds the old model or the new one. Returns ``destination``."""
    from ..nn import Q4Config

    cfg = Q4Config() if config is None else config
    if not isinstance(cfg, Q4Config):
        raise TypeError(f"config must be a q4lab.Q4Config, got {type(cfg).__name__}")
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise FileNotFoundError(f"source {source} is not a directory")
    check_separate(source, destination)
    max_bytes = parse_size(max_shard_size)
    recover(source)
    entries, _ = inventory(source)
    hf_config = _config(source)
    model = empty_model(hf_config)
    plan, dense, compute_dtype = _plan(model, entries, cfg, source)
    hf_config.architectures = [type(model).__name__]  # as save_pretrained of the loaded model
    hf_config.quantization_config = bnb_quantization_config(cfg.quant_type, cfg.double_quant,
                                                            compute_dtype, dense)
    with write_directory(destination, overwrite=overwrite, source=source) as tmp:
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
                    and not p.name.endswith(_NOT_COPIED) and not is_temporary(p.name):
                shutil.copy2(p, tmp / p.name)
    return destination
