"""Rank script of tests/test_fsdp.py: ``torchrun --nproc-per-node N tests/fsdp_ranks.py CHECK OUT``.

CHECK ``shard``: a tiny Llama (transformers ``LlamaConfig``, random init, odd sizes) quantized by
q4lab, with and without LoRA, sharded by plain ``fully_shard`` per decoder layer + root, with and
without ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: records the local bytes of
every 4-bit layer, the bytes FSDP gathers inside forward (compared with the unsharded ones), and
every tensor storage a layer still references after forward/backward and after a fused decode.
CHECK ``train``: LoRA on every linear, AdamW, each rank on its own half of the batch, against one
process (the same model, unsharded, in this process) on the whole batch; a torch.distributed
checkpoint after step 2 and a resumed run; consolidation to a 4-bit model directory and a PEFT
adapter directory. Each rank writes OUT/rank<r>.json; the test asserts on them.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import q4lab
from q4lab import distributed as qdist
from q4lab.nn import Linear4bit

#: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank): Q4LAB_FSDP_DEVICE, set by the test
DEVICE = os.environ.get("Q4LAB_FSDP_DEVICE", "cpu")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0, hidden=72, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=100,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def quantized(seed=0, lora=False, quant_storage=torch.uint8):
    model = tiny_llama(seed)
    q4lab.quantize_model(model, q4lab.Q4Config(compute_dtype=torch.float32, min_numel=0),
                         progress=False)
    if quant_storage != torch.uint8:
        from q4lab import storage

        for m in model.modules():
            if isinstance(m, Linear4bit):
                m._set_packed(storage.to_storage(m.packed_bytes.clone(), quant_storage),
                              m.quant_state)
                m.__dict__.pop("_weight_cache", None)
    if lora:
        torch.manual_seed(seed + 1)
        q4lab.add_lora(model, r=4, alpha=8, target_modules=TARGETS)
    return model.to(DEVICE)


def layer_bytes(model):
    """{name: (packed bytes, stats bytes)} as uint8 copies, of an unsharded model."""
    return {n: (m.packed_bytes.clone(), m._parameters["quant_stats"].detach().clone())
            for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if a.numel() != b.numel():
        return f"{a.numel()} vs {b.numel()} bytes"
    bad = (a != b).nonzero()
    return "" if bad.numel() == 0 else f"{bad.numel()}/{a.numel()} bytes differ, first at " \
                                       f"{int(bad[0])}"


def storages_held(layer: Linear4bit) -> int:
    """Bytes of every tensor storage reachable from the layer's attributes and caches that is
    not its registered (sharded) parameters: 0 unless something pins gathered bytes."""
    own = {_ptr(p) for p in layer._parameters.values() if p is not None}
    seen, total = set(), 0

    def walk(obj, depth=0):
        nonlocal total
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            key = _ptr(local)
            if key not in own and key not in seen:
                seen.add(key)
                total += local.untyped_storage().nbytes()
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                walk(o, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o, depth + 1)
        elif hasattr(obj, "__dataclass_fields__"):
            for f in obj.__dataclass_fields__:
                if f != "code":  # shared codebooks: constants, not layer bytes
                    walk(getattr(obj, f), depth + 1)

    for k, v in layer.__dict__.items():
        if k not in ("_parameters", "_buffers", "_modules"):
            walk(v)
    return total


def _ptr(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def check_shard(out):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    rank, world = dist.get_rank(), dist.get_world_size()
    res = {}
    cases = {"plain": (False, None, torch.uint8),
             "lora_bf16_policy": (True, MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                             reduce_dtype=torch.float32),
                                  torch.uint8),
             "lora_bf16_storage_bf16_policy": (True, MixedPrecisionPolicy(
                 param_dtype=torch.bfloat16, reduce_dtype=torch.float32), torch.bfloat16)}
    for case, (lora, policy, quant_storage) in cases.items():
        model = quantized(lora=lora, quant_storage=quant_storage)
        full = layer_bytes(model)
        before = qdist.memory_by_part(model)
        qdist.shard_model(model, mp_policy=policy)
        after = qdist.memory_by_part(model)
        seen_in_forward = {}

        name_of = {id(m): n for n, m in model.named_modules()}

        def hook(mod, args, name_of=name_of, full=full, seen_in_forward=seen_in_forward):
            packed, state = mod._weight()
            stats = mod._parameters["quant_stats"]
            seen_in_forward[name_of[id(mod)]] = (
                differ(packed, full[name_of[id(mod)]][0]),
                differ(stats, full[name_of[id(mod)]][1]),
                str(state.absmax.dtype), str(mod._parameters["packed"].dtype))

        handles = [m.register_forward_pre_hook(hook) for m in model.modules()
                   if isinstance(m, Linear4bit)]
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(rank))
        ids = ids.to(DEVICE)
        loss = model(input_ids=ids, labels=ids).loss
        if lora:
            loss.backward()
        for h in handles:
            h.remove()
        held_after_train = {n: storages_held(m) for n, m in model.named_modules()
                            if isinstance(m, Linear4bit)}
        fused = []
        handles = [m.register_forward_pre_hook(lambda mod, args, fused=fused: fused.append(
            mod.uses_fused(args[0]))) for m in model.modules() if isinstance(m, Linear4bit)]
        with torch.no_grad():  # one-row decode: the fused path and its kernel-argument cache
            model(input_ids=ids[:1, :1])
        for h in handles:
            h.remove()
        held_after_decode = {n: storages_held(m) for n, m in model.named_modules()
                             if isinstance(m, Linear4bit)}
        local = {}
        for n, m in model.named_modules():
            if isinstance(m, Linear4bit):
                p, s = m._parameters["packed"], m._parameters["quant_stats"]
                local[n] = [type(p).__name__, p.to_local().numel() * p.element_size(),
                            s.to_local().numel(), full[n][0].numel(), full[n][1].numel()]
        with qdist.gathered(model):
            regathered = {n: (differ(m.packed_bytes, full[n][0]),
                              differ(m._parameters["quant_stats"], full[n][1]))
                          for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        res[case] = {"before": before, "after": after, "forward": seen_in_forward,
                     "held_after_train": held_after_train,
                     "held_after_decode": held_after_decode, "fused": fused,
                     "local": local, "regathered": regathered, "loss": loss.item()}
    # a layer so small that rank 1's shard of its codes is empty: it just works
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(Linear4bit.from_linear(torch.nn.Linear(2, 1))).to(DEVICE)
    tiny_full = tiny[0].dequantized_weight()
    qdist.shard_model(tiny, layers=[])
    res["empty_shard_local_bytes"] = tiny[0]._parameters["packed"].to_local().numel()
    x = torch.ones(3, 2, requires_grad=True, device=DEVICE)
    tiny(x).sum().backward()
    res["empty_shard_grad_ok"] = bool(torch.equal(x.grad, tiny_full.expand(3, 2)))
    # a mesh that does not match the world is refused by name
    from torch.distributed.device_mesh import init_device_mesh

    try:
        qdist.shard_model(quantized(), mesh=init_device_mesh(DEVICE.split(":")[0], (world, 1)))
        res["mesh_error"] = ""
    except ValueError as exc:
        res["mesh_error"] = str(exc)
    # a float32 byte storage under a bf16 policy: FSDP casts it; q4lab must refuse, not decode
    model = quantized(quant_storage=torch.float32)
    qdist.shard_model(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    try:
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=DEVICE))
        res["cast_storage_error"] = ""
    except RuntimeError as exc:
        res["cast_storage_error"] = str(exc)
    write(out, res)


def write(out, res):
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)


def batch(steps=4, rows=4, seq=16):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 96, (rows, seq), generator=g).to(DEVICE) for _ in range(steps)]


def train(model, batches, rows: slice, opt=None, start=0, group=None):
    """Per step: loss on ``rows`` of the batch (mean over its tokens), AdamW; returns the
    losses (averaged over the ranks when sharded: the whole batch's loss)."""
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                   lr=1e-2, weight_decay=0.01)
    losses = []
    for ids in batches[start:]:
        losses.append(qdist.train_step(model, opt, ids[rows], bool(group)))
    return losses, opt


def adapter_weights(model):
    with qdist.gathered(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_train(out):
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = batch()
    rows_per_rank = batches[0].shape[0] // world
    mine = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    # one process, whole batch (computed here, unsharded, no communication)
    single = quantized(lora=True)
    single_losses, _ = train(single, batches, slice(None))
    single_adapters = {n: p.detach().clone() for n, p in single.named_parameters()
                       if p.requires_grad}
    # N processes, each on its own rows
    model = quantized(lora=True)
    full = layer_bytes(model)
    qdist.shard_model(model)
    losses, opt = train(model, batches[:2], mine, group=True)
    ckpt = os.path.join(out, "ckpt")
    qdist.save_checkpoint(model, opt, ckpt, step=2)
    more, opt = train(model, batches, mine, opt=opt, start=2, group=True)
    losses += more
    adapters = adapter_weights(model)
    memory = qdist.memory_by_part(model, opt)
    with qdist.gathered(model):
        base_unchanged = {n: (differ(m.packed_bytes, full[n][0]),
                              differ(m._parameters["quant_stats"], full[n][1]))
                          for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        if rank == 0:  # every layer gathered (no state_dict call: FSDP's hook reshards)
            q4lab.save_adapters(model, os.path.join(out, "adapter"))
            plain = tiny_llama()  # the same architecture, unsharded, float
            qdist.copy_gathered_layers(model, plain)
            q4lab.save_pretrained(plain, os.path.join(out, "model4bit"))
    # resume from the step-2 checkpoint in a fresh sharded model and optimizer
    resumed = quantized(lora=True, seed=0)
    torch.manual_seed(99)  # different adapter init: the checkpoint must overwrite it
    for p in resumed.parameters():
        if p.requires_grad:
            p.data.normal_()
    qdist.shard_model(resumed)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.01)
    step = qdist.load_checkpoint(resumed, opt2, ckpt)
    resumed_losses, _ = train(resumed, batches, mine, opt=opt2, start=step, group=True)
    diffs = {n: float((adapters[n] - single_adapters[n]).abs().max()) for n in adapters}
    write(out, {"single": single_losses, "sharded": losses, "resumed": resumed_losses,
                "step": step, "adapter_max_abs_diff": diffs, "base_unchanged": base_unchanged,
                "memory": memory, "adapter_names_match": sorted(adapters) == sorted(
                    single_adapters)})


if __name__ == "__main__":
    torch.set_num_threads(1)
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        DEVICE = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if DEVICE.startswith("cuda") else "gloo")
    try:
        {"shard": check_shard, "train": check_train}[sys.argv[1]](sys.argv[2])
    finally:
        dist.destroy_process_group()
