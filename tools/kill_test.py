"""Kill test at scale: ``python -m q4lab quantize`` over a >= 1 GB checkpoint, killed with SIGTERM
and SIGKILL at random moments, then run again (docs/data-safety.md; the small version runs in CI:
tests/test_data_safety.py).

Each round: the destination holds an old model (FP4, in shards) plus a file of the user's; the CLI
quantizes the source into it with ``--overwrite`` and is killed after a random delay in
[0, the last uninterrupted run's duration]. Checked: after SIGTERM no temporary is left at all;
after either signal the destination, as q4lab sees it (``q4lab.formats.atomic.recover``, which
every q4lab write and ``from_pretrained`` run first), holds exactly the old or exactly the new
model's files (sha256 of every file) and the user's file; a second run then writes the new model
and leaves no temporary.
Prints one line per round and a summary; writes bench/results/kill_test.json (machine facts from
bench/_machine.py).

Usage: python tools/kill_test.py [--rounds 6] [--gb 1.1] [--workdir /tmp/q4lab-kill] [--seed 0]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def digests(directory: Path) -> dict:
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != "notes.txt":
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            out[str(p.relative_to(directory))] = h.hexdigest()
    return out


def temporaries(root: Path) -> list:
    return sorted(str(p) for p in root.rglob(".q4lab-tmp-*"))


def build_source(path: Path, gb: float) -> None:
    """A random bfloat16 Llama of about ``gb`` GB in 500 MB shards (kept between runs)."""
    if (path / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp
    layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")


def cli(source: Path, destination: Path, *extra) -> list:
    return [sys.executable, "-m", "q4lab", "quantize", str(source), str(destination),
            "--overwrite", "--quiet", "--max-shard-size", "200MB", *extra]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--gb", type=float, default=1.1, help="source checkpoint size (bf16)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/q4lab-kill"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    sys.path.insert(0, str(ROOT))
    from q4lab.formats import atomic

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    source, dst, keep, new = work / "source", work / "out", work / "old", work / "new"
    build_source(source, args.gb)
    size = sum(p.stat().st_size for p in source.iterdir())
    print(f"source: {size / 1e9:.2f} GB in {len(list(source.glob('*.safetensors')))} shards")
    if not keep.exists():
        subprocess.run(cli(source, keep, "--quant-type", "fp4"), check=True, env=env)
        (keep / "notes.txt").write_text("the user's own file")
    start = time.perf_counter()
    shutil.rmtree(new, ignore_errors=True)
    subprocess.run(cli(source, new), check=True, env=env)
    duration = time.perf_counter() - start
    old_files, new_files = digests(keep), digests(new)
    print(f"one run: {duration:.1f} s; old model {len(old_files)} files, new {len(new_files)}")
    rng = random.Random(args.seed)
    rounds = []
    for i in range(args.rounds):
        sig = (signal.SIGTERM, signal.SIGKILL)[i % 2]
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(keep, dst)
        proc = subprocess.Popen(cli(source, dst), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        delay = rng.uniform(0, duration)
        time.sleep(delay)
        proc.send_signal(sig)
        code = proc.wait()
        left_by_kill = temporaries(work)
        t = time.perf_counter()
        atomic.recover(dst)
        recover_s = time.perf_counter() - t
        state = digests(dst)
        verdict = "old" if state == old_files else "new" if state == new_files else "MIX"
        user_file = (dst / "notes.txt").read_text() == "the user's own file"
        t = time.perf_counter()
        rerun = subprocess.run(cli(source, dst), env=env, capture_output=True, text=True)
        duration = time.perf_counter() - t  # the next delay spans a run at today's load
        after = "new" if rerun.returncode == 0 and digests(dst) == new_files else "WRONG"
        ok = (verdict != "MIX" and user_file and after == "new" and not temporaries(work)
              and not (sig == signal.SIGTERM and left_by_kill))
        rounds.append({"signal": sig.name, "delay_s": round(delay, 2), "exit": code,
                       "temporaries_after_kill": len(left_by_kill), "state": verdict,
                       "recover_s": round(recover_s, 3), "user_file_kept": user_file,
                       "rerun_s": round(duration, 1),
                       "after_rerun": after, "ok": ok})
        print(f"round {i}: {sig.name} after {delay:5.1f} s -> exit {code}, "
              f"{len(left_by_kill)} temporaries, destination {verdict}, second run {after}"
              f"{'' if ok else '  FAILED'}")
    passed = sum(r["ok"] for r in rounds)
    print(f"{passed}/{len(rounds)} rounds: old or new model, never a mix, no temporary left")
    sys.path.insert(0, str(ROOT / "bench"))
    from _machine import machine

    out = ROOT / "bench" / "results" / "kill_test.json"
    out.write_text(json.dumps({"machine": machine(), "source_bytes": size,
                               "run_s": round(duration, 1), "rounds": rounds}, indent=2) + "\n")
    print(f"wrote {out}")
    sys.exit(0 if passed == len(rounds) else 1)


if __name__ == "__main__":
    main()
