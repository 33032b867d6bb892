"""Per-rank memory of a QLoRA run sharded by PyTorch FSDP2, for world sizes 1 and 2 (CPU, gloo).

Each world size is one ``torchrun --standalone --nproc-per-node N`` launch of this file. Every rank
builds the same random-init Llama (transformers ``LlamaConfig``), quantizes it with q4lab, adds LoRA
on every linear layer, shards it with ``q4lab.distributed.shard_model`` (``fully_shard`` per
decoder layer + root) and trains 2 AdamW steps; it records ``q4lab.distributed.memory_by_part``
(bytes from the local storage actually held) before sharding, after sharding and after training,
and its peak RSS (``resource.getrusage``). Prints each part per rank and its ratio to world size 1,
and writes bench/results/fsdp_cpu_<date>.json with the machine record (bench/_machine.py).

    python bench/bench_fsdp.py [--hidden 512 --layers 4] [--worlds 1 2]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import q4lab

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    q4lab.quantize_model(model, progress=False)
    torch.manual_seed(1)
    q4lab.add_lora(model, r=args.rank, alpha=2 * args.rank, target_modules=TARGETS)
    return model


def rank_main(args):
    import torch
    import torch.distributed as dist

    from q4lab import distributed as qdist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args)
    record = {"rank": rank, "unsharded": qdist.memory_by_part(model)}
    qdist.shard_model(model)
    record["sharded"] = qdist.memory_by_part(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        ids = ids.chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    record["trained"] = qdist.memory_by_part(model, opt)
    record["losses"] = losses
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    records = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        Path(args.out).write_text(json.dumps(records))
    dist.destroy_process_group()


def launch(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(world), __file__, "--rank-run", "--out", str(out),
               *[f"--{k}={v}" for k, v in vars(args).items()
                 if k in ("hidden", "layers", "vocab", "rank", "batch", "seq")]]
        env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_run:
        return rank_main(args)
    sys.path.insert(0, str(HERE))
    from _machine import machine

    runs = {w: launch(w, args) for w in args.worlds}
    base = runs[min(runs)][0]["trained"]
    print(f"{'world':>5} {'rank':>4} {'base_4bit':>10} {'stats':>8} {'adapters':>9} "
          f"{'optim':>9} {'total':>10} {'base/base@1':>11} {'peak RSS MB':>11}")
    for w, ranks in runs.items():
        for r in ranks:
            m = r["trained"]
            print(f"{w:>5} {r['rank']:>4} {m['base_4bit']:>10,} {m['statistics']:>8,} "
                  f"{m['adapters']:>9,} {m['optimizer']:>9,} {m['total']:>10,} "
                  f"{m['base_4bit'] / base['base_4bit']:>11.3f} "
                  f"{r['peak_rss_bytes'] / 2**20:>11.1f}")
    config = {k: v for k, v in vars(args).items() if k not in ("rank_run", "out")}
    result = machine(benchmark="bench_fsdp", config=config,
                     runs={str(w): ranks for w, ranks in runs.items()})
    date = dt.date.today().isoformat()
    path = HERE / "results" / f"fsdp_cpu_{date}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
