"""q4lab on N processes: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) over a 4-bit model.

Nothing here shards anything itself: ``Linear4bit`` keeps its codes and statistics in frozen
parameters (q4lab/storage.py), so plain ``fully_shard`` splits them like any weight and gathers
them around each layer's forward and backward (docs/distributed.md). This module holds the small
helpers around that engine: ``shard_model`` (one ``fully_shard`` per decoder layer, then the root,
as PyTorch's FSDP2 tutorial and Answer.AI's fsdp_qlora wrap), ``memory_by_part`` (bytes each rank
really holds), ``gathered`` (whole layers for consolidation: ``FSDPModule.unshard`` / ``reshard``),
and ``save_checkpoint`` / ``load_checkpoint`` (``torch.distributed.checkpoint`` of the adapters and
the optimizer, each rank writing its own shards; ``torch.distributed.checkpoint.state_dict``).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from .nn import Linear4bit


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        local = _local(t)
        storage = local.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes(), local.device)
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def memory_by_part(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this process holds, by part, from the local storage of every tensor (a sharded
    parameter counts its local shard, padding included; a tensor shared by several modules
    once): ``base_4bit`` (packed codes), ``statistics`` (absmax / nested absmax / offset),
    ``adapters`` (trainable parameters), ``other_frozen`` (embeddings, norms, lm_head ...),
    ``buffers``, ``optimizer`` (its state tensors) and ``total``; plus ``rank`` and ``world``."""
    seen: set = set()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    out = {"base_4bit": _storage_bytes((m._parameters["packed"] for m in layers), seen),
           "statistics": _storage_bytes((m._parameters["quant_stats"] for m in layers), seen)}
    params = list(model.parameters())
    out["adapters"] = _storage_bytes((p for p in params if p.requires_grad), seen)
    out["other_frozen"] = _storage_bytes((p for p in params if not p.requires_grad), seen)
    out["buffers"] = _storage_bytes(model.buffers(), seen)
    state = [] if optimizer is None else [
        v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    out["optimizer"] = _storage_bytes(state, seen)
    out["total"] = sum(out.values())
    ready = dist.is_available() and dist.is_initialized()
    out["rank"], out["world"] = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
    return out


def check_process_group(mesh=None):
    """The device mesh to shard over (``mesh`` or a 1-D one over all ranks), after clear errors
    for the two usual mistakes: no process group, a mesh that does not cover the world."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no torch.distributed process group: start the script with "
                           "`torchrun --nproc-per-node N ...` and call "
                           "torch.distributed.init_process_group() (backend 'gloo' on CPU, "
                           "'nccl' on GPUs) before sharding")
    world = dist.get_world_size()
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return init_device_mesh(device, (world,))
    if mesh.ndim != 1 or mesh.size() != world:
        raise ValueError(f"device mesh {tuple(mesh.shape)} does not match the {world} processes "
                         f"of the process group; build it with init_device_mesh(device, "
                         f"({world},)) (q4lab shards over one mesh dimension)")
    return mesh


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the longest ``nn.ModuleList`` in ``model``
    (``model.model.layers`` in transformers' Llama/Mistral/Qwen, ``h`` in GPT-2)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=len))


def shard_model(model: nn.Module, mesh=None, mp_policy=None, reshard_after_forward=True,
                layers: list[nn.Module] | None = None) -> nn.Module:
    """``fully_shard`` each decoder layer (``layers``, default :func:`decoder_layers`) and then
    ``model`` itself, over ``mesh`` (default: all ranks). Every rank must hold the same model
    before this call (seed it). Returns ``model`` (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = check_process_group(mesh)
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
          "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in decoder_layers(model) if layers is None else layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Within the block, every FSDP-sharded module holds its whole parameters (all ranks call
    it: it is a collective), so ``q4lab.save_pretrained``, ``q4lab.save_adapters``,
    ``quant_state`` etc. work as on a single process; sharded again on exit."""
    modules = _fsdp_modules(model)
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()


def copy_gathered_layers(model: nn.Module, target: nn.Module) -> nn.Module:
    """Within :func:`gathered`: give ``target`` (the same architecture, unsharded: float or
    4-bit) every 4-bit layer of ``model`` with identical bytes (a LoRA base ``x.base`` goes to
    ``x``), so ``q4lab.save_pretrained(target, ...)`` writes the consolidated 4-bit model.
    ``model.state_dict()`` is not used: FSDP's state-dict hook re-registers the shards."""
    from .quantize import set_submodule

    for name, layer in model.named_modules():
        if not isinstance(layer, Linear4bit):
            continue
        packed, state = layer._weight()
        copy = Linear4bit(layer.in_features, layer.out_features, packed.clone(),
                          _cloned(state), None if layer.bias is None else _local(layer.bias),
                          layer.compute_dtype)
        set_submodule(target, name.removesuffix(".base"), copy)
    return target


def _cloned(state):
    from dataclasses import replace

    nested = None if state.state2 is None else replace(state.state2,
                                                        absmax=state.state2.absmax.clone())
    offset = None if state.offset is None else state.offset.clone()
    return replace(state, absmax=state.absmax.clone(), offset=offset, state2=nested)


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # only what training changes: the frozen 4-bit base is never written (and its statistics,
    # kept out of the state dict like bitsandbytes' quant_state, would not fit DCP's frozen filter)
    options = StateDictOptions(strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd, "optimizer": optim_sd}, options


def train_step(model: nn.Module, optimizer, input_ids: torch.Tensor,
               reduce: bool | None = None) -> float:
    """One causal-LM training step on this rank's rows: forward with labels = inputs, backward,
    ``optimizer.step()``, ``zero_grad``; returns the loss averaged over the ranks (float32 sum /
    world size: the whole batch's loss when every rank has as many rows) when ``reduce`` (default:
    when a process group of more than one rank is up), else this process's loss. ``reduce=False``
    for a model trained by one rank alone inside a group. The one training step of
    ``q4lab finetune``, the FSDP demo and the multi-rank tests."""
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    value = loss.detach().clone()
    if reduce is None:
        reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if reduce:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def save_checkpoint(model: nn.Module, optimizer, directory, step: int) -> str:
    """Write a sharded checkpoint of the trainable parameters and the optimizer state with
    ``torch.distributed.checkpoint`` (every rank writes its own shards; the frozen 4-bit base is
    not written: it is re-read or re-quantized from its source). All ranks call it."""
    import torch.distributed.checkpoint as dcp

    state, _ = _state(model, optimizer)
    state["step"] = torch.tensor(step)
    dcp.save(state, checkpoint_id=os.fspath(directory))
    return os.fspath(directory)


def load_checkpoint(model: nn.Module, optimizer, directory) -> int:
    """Load what :func:`save_checkpoint` wrote into an identically sharded model and optimizer
    (in place); returns the step it was saved at. All ranks call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    state, options = _state(model, optimizer)
    state["step"] = torch.tensor(0)
    dcp.load(state, checkpoint_id=os.fspath(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=options)
    return int(state["step"])
