"""Contrastive training that runs the same under python, torchrun, accelerate launch and srun.

Usage::

    python -m dist_infonce.train [--config PATH] [key=value ...]
    torchrun --nproc_per_node=2 -m dist_infonce.train [--config PATH] [key=value ...]

With no arguments it runs the embedded default: SimCLR on scikit-learn's digits
with NT-Xent over the global batch, then a linear probe and kNN on held-out digits.
Re-running a command with the same ``output_dir`` resumes from its newest checkpoint.
``--config`` may stand before, between or after the overrides: the file is applied
first, then the overrides in their order.

Exit codes: 0 finished; 1 an unexpected error, or a peer that died or went silent;
2 a user error in the config (the key is named); 3 stopped on a non-finite loss or
gradient (``train.on_nonfinite=stop``); 4 a checkpoint could not be written; 75
stopped on a signal after writing a checkpoint (re-run to resume). The run itself is
:class:`dist_infonce.trainer.Trainer`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dist_infonce.trainer.config import ConfigError, all_keys, field_docs, load_config
from dist_infonce.trainer.launch import slurm_env
from dist_infonce.trainer.resilience import StopTraining, collective_failure_message
from dist_infonce.trainer.trainer import Trainer

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--config PATH`` and ``key=value`` overrides (keys in the epilog)."""
    docs = field_docs()
    width = max(len(k) for k in all_keys())
    keys = "\n".join(f"  {k:<{width}}  {docs[k]}" for k in all_keys())
    parser = argparse.ArgumentParser(
        prog="python -m dist_infonce.train",
        description="Contrastive training (SimCLR / CLIP / InfoNCE) over the global batch.",
        epilog=f"config keys (key=value overrides):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", help="YAML config (default: the embedded default)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, applied in order"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, build the run, train, tear down. Returns the exit code."""
    parser = build_parser()
    # Intermixed: `key=v --config X key=v` and `--config X key=v` both parse.
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    os.environ.update(slurm_env(os.environ))
    trainer = Trainer(cfg)
    clean, code = False, 1
    try:
        trainer.setup()
        trainer.fit()
        clean, code = True, 0
    except ConfigError as e:
        # A user error found while building (an import path, fp16 on CPU): no traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except StopTraining as e:
        # Every rank agreed to stop here (a signal, a NaN, a failed checkpoint write).
        print(f"{parser.prog}: {e}", file=sys.stderr, flush=True)
        clean, code = True, e.exit_code
    except Exception as e:
        # A dead or silent peer: say so in one line (gloo's error names no rank).
        if message := collective_failure_message(e, cfg.dist.timeout_s):
            print(f"{parser.prog}: {message}", file=sys.stderr, flush=True)
        raise
    finally:
        trainer.close(clean=clean, exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
