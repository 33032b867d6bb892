"""Command line: ``python -m q4lab quantize SOURCE DESTINATION [options]``; and
``torchrun --nproc-per-node N -m q4lab finetune MODEL TEXT OUT`` (q4lab/finetune.py).

Streams a (sharded) safetensors transformers checkpoint into a transformers + bitsandbytes 4-bit
directory with ``q4lab.quantize_checkpoint`` (q4lab/formats/stream.py); the options are the fields
of ``q4lab.Q4Config``. Every error prints one line naming the problem and the fix (the flags as
typed here: ``--overwrite``), without a traceback, and exits with status 1.
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


def _error(command: str, exc: BaseException) -> int:
    """Print ``exc`` as one line (no traceback) and return the exit status 1."""
    from .formats.atomic import DestinationExistsError

    if isinstance(exc, DestinationExistsError):
        text = (f"{exc.destination} exists and is not empty; pass --overwrite to replace the model "
                f"in it (its other files are kept) or choose another destination")
    elif isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"cannot write {exc.filename}: {exc.strerror}"
        if isinstance(exc, PermissionError):
            text += " (choose a destination you may write to, or fix its permissions)"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    print(f"python -m q4lab {command}: error: {text}", file=sys.stderr)
    return 1


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
    except KeyboardInterrupt:
        print(f"python -m q4lab {args.command}: interrupted; {args.destination} was left as it "
              f"was", file=sys.stderr)
        return 130
    except Exception as exc:  # every error is one line naming the problem, never a traceback
        return _error(args.command, exc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
