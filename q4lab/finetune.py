"""``torchrun --nproc-per-node N -m q4lab finetune MODEL TEXT OUT``: QLoRA on N processes.

Load or quantize a model (``smollm2``: SmolLM2-135M-Instruct through ``q4lab.models.load_smollm2``;
a transformers directory: 4-bit ones open with ``q4lab.from_pretrained``, float ones are quantized
with ``q4lab.quantize_model``), add LoRA to every 4-bit linear layer, shard with FSDP2
(``q4lab.distributed.shard_model``), train with AdamW on a UTF-8 text file cut in blocks of
``--seq-len`` tokens (each rank its own rows of every batch; a tqdm bar on rank 0), write a
``torch.distributed.checkpoint`` every ``--checkpoint-every`` steps (resumed from when present)
and finally a PEFT adapter directory ``OUT/adapter`` and ``OUT/losses.json``. docs/distributed.md.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m q4lab finetune",
                                description=__doc__.splitlines()[0])
    p.add_argument("model", help="'smollm2' or a transformers model directory (float or "
                                 "bitsandbytes 4-bit) with its tokenizer")
    p.add_argument("text", help="UTF-8 text file to train on")
    p.add_argument("output", help="directory for checkpoints, adapter/ and losses.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="rows per step, over all ranks")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    return p


def load_model(source: str):
    """(model with 4-bit linear layers, tokenizer) on every rank, identically."""
    import q4lab

    if source == "smollm2":
        from .models import load_smollm2

        model, tokenizer = load_smollm2()
        q4lab.quantize_model(model, q4lab.Q4Config(compute_dtype=torch.float32), progress=False)
        return model, tokenizer
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{source}: neither 'smollm2' nor a transformers model directory "
                                f"(no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if "quantization_config" in json.loads((path / "config.json").read_text()):
        return q4lab.from_pretrained(path, progress=False), tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    q4lab.quantize_model(model, q4lab.Q4Config(compute_dtype=torch.float32), progress=False)
    return model, tokenizer


def token_blocks(tokenizer, text_file, seq_len: int) -> torch.Tensor:
    """The file's tokens cut into rows of ``seq_len`` (the tail that does not fill one dropped)."""
    text = Path(text_file).read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    rows = ids.numel() // seq_len
    if rows == 0:
        raise ValueError(f"{text_file}: {ids.numel()} tokens, fewer than one block of "
                         f"--seq-len {seq_len}; give more text or a shorter --seq-len")
    return ids[:rows * seq_len].view(rows, seq_len)


def finetune(args) -> dict:
    import q4lab
    from tqdm.auto import tqdm

    from . import distributed as qdist

    mesh = qdist.check_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} rows cannot be split over {world} processes; "
                         f"use a multiple of {world}")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    model.config.use_cache = False
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, q4lab.Linear4bit)} & set(TARGETS)) or ["q_proj", "v_proj"]
    torch.manual_seed(args.seed + 1)
    q4lab.add_lora(model, r=args.rank, alpha=args.alpha, target_modules=targets)
    qdist.shard_model(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    blocks = token_blocks(tokenizer, args.text, args.seq_len)
    out = Path(args.output)
    ckpt = out / "checkpoint"
    start = qdist.load_checkpoint(model, opt, ckpt) if ckpt.is_dir() else 0
    losses = []
    per_rank = args.batch // world
    g = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(blocks), generator=g)
                       for _ in range(-(-args.steps * args.batch // len(blocks)) + 1)])
    bar = tqdm(range(start, args.steps), desc=f"finetune on {world} process(es)",
               disable=rank != 0, initial=start, total=args.steps)
    model.train()
    for step in bar:
        rows = order[step * args.batch:(step + 1) * args.batch][rank * per_rank:
                                                                (rank + 1) * per_rank]
        losses.append(qdist.train_step(model, opt, blocks[rows]))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            qdist.save_checkpoint(model, opt, ckpt, step + 1)
    with qdist.gathered(model):
        if rank == 0:
            q4lab.save_adapters(model, out / "adapter")
            (out / "losses.json").write_text(json.dumps({"start": start, "losses": losses}))
    dist.barrier()
    return {"start": start, "losses": losses}


def main(argv=None) -> int:
    """Entry point of ``python -m q4lab finetune``; errors print one line and return 1."""
    import sys

    args = parser().parse_args(argv)
    owns_group = False
    if not dist.is_initialized() and "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")  # CPU; the model stays on the CPU
        owns_group = True
    try:
        finetune(args)
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"python -m q4lab finetune: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0
