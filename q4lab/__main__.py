"""Command line: ``python -m q4lab quantize SOURCE DESTINATION [options]``; and
``torchrun --nproc-per-node N -m q4lab finetune MODEL TEXT OUT`` (q4lab/finetune.py).

Streams a (sharded) safetensors transformers checkpoint into a transformers + bitsandbytes 4-bit
directory with ``q4lab.quantize_checkpoint`` (q4lab/formats/stream.py); the options are the fields of
``q4lab.Q4Config``. Errors print one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m q4lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a safetensors checkpoint directory to 4 bits, "
                                        "tensor by tensor",
                       description="Quantize SOURCE (config.json + model.safetensors or shards "
                                   "+ index) into DESTINATION without loading the model; the "
                                   "result loads with transformers + bitsandbytes and with "
                                   "q4lab.from_pretrained.")
    q.add_argument("source")
    q.add_argument("destination")
    q.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--no-double-quant", action="store_true",
                   help="store absmax as float32 (4.5 bits/param at blocksize 64)")
    q.add_argument("--compute-dtype", default="bfloat16",
                   choices=("float32", "float16", "bfloat16", "auto"),
                   help="bnb_4bit_compute_dtype written to config.json; auto = the weights' dtype")
    q.add_argument("--skip-modules", nargs="*", default=["lm_head"], metavar="NAME",
                   help="layers kept in full precision (name components or dotted suffixes)")
    q.add_argument("--min-numel", type=int, default=4096,
                   help="layers with fewer weights stay in full precision")
    q.add_argument("--max-shard-size", default="5GB")
    q.add_argument("--backend", default="auto", choices=("auto", "cpu", "reference"))
    q.add_argument("--overwrite", action="store_true", help="replace DESTINATION if it exists")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:  # torchrun ... -m q4lab finetune: q4lab/finetune.py
        from .finetune import main as finetune_main

        return finetune_main(argv[1:])
    args = _parser().parse_args(argv)
    from . import Q4Config, quantize_checkpoint

    try:
        cfg = Q4Config(quant_type=args.quant_type, blocksize=args.blocksize,
                       double_quant=not args.no_double_quant,
                       compute_dtype=None if args.compute_dtype == "auto" else args.compute_dtype,
                       skip_modules=tuple(args.skip_modules), min_numel=args.min_numel,
                       backend=args.backend)
        out = quantize_checkpoint(args.source, args.destination, cfg,
                                  max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                  progress=not args.quiet)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"python -m q4lab quantize: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
