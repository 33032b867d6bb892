"""A QLoRA run on N processes you can watch: ``torchrun --nproc-per-node 2 -m q4lab.fsdp_demo OUT``.

Every rank builds the same small random-init Llama (transformers ``LlamaConfig``), quantizes it
with q4lab, adds LoRA on every linear layer and records ``q4lab.distributed.memory_by_part``;
rank 0 also trains an unsharded copy on the whole batch (the 1-process reference). Then the
model is sharded (``q4lab.distributed.shard_model``: ``fully_shard`` per decoder layer + root),
bytes are recorded again, and every rank trains on its own rows of each batch with AdamW.
Rank 0 writes OUT/fsdp_demo.json: per-rank bytes before/after sharding and both loss curves.
Used by notebooks/11_qlora_on_more_than_one_machine.ipynb (docs/distributed.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .distributed import train_step

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(hidden: int = 128, layers: int = 2, vocab: int = 256, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    import q4lab

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    q4lab.quantize_model(model, q4lab.Q4Config(compute_dtype=torch.float32, min_numel=0),
                         progress=False)
    torch.manual_seed(seed + 1)
    q4lab.add_lora(model, r=8, alpha=16, target_modules=TARGETS)
    return model


def train(model, batches, rank: int = 0, world: int = 1, reduce: bool = False):
    """AdamW steps on each batch's rows of this rank; (losses, optimizer)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for ids in batches:
        losses.append(train_step(model, opt, ids.chunk(world)[rank], reduce))
    return losses, opt


def main(out: str, steps: int = 8) -> None:
    from . import distributed as qdist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 256, (1, 16), generator=g).repeat(4 * world, 4)  # learnable
    batches = [torch.roll(pattern, int(s), dims=1) for s in torch.randint(0, 64, (steps,),
                                                                          generator=g)]
    single = train(build(), batches)[0] if rank == 0 else None
    model = build()
    before = qdist.memory_by_part(model)
    qdist.shard_model(model)
    after = qdist.memory_by_part(model)
    sharded, opt = train(model, batches, rank, world, reduce=True)
    trained = qdist.memory_by_part(model, opt)
    records = [None] * world
    dist.all_gather_object(records, {"rank": rank, "before": before, "after": after,
                                     "trained": trained})
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "fsdp_demo.json").write_text(json.dumps(
            {"world": world, "ranks": records, "single_losses": single,
             "sharded_losses": sharded}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
