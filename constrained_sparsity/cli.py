"""Command line: ``csparse train CONFIG [key=value ...]`` and ``csparse train --resume RUN_DIR``.

Exit codes: 0 success, 1 the run failed (diverged), 2 bad input (config or data),
128 + signal number after SIGINT / SIGTERM (a checkpoint was written first).
"""

from __future__ import annotations

import argparse
import sys

from .errors import CSparseError, TrainingDiverged, TrainingInterrupted

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csparse", description="Train sparse neural networks to a declared sparsity budget."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a network as a YAML config declares")
    train.add_argument("config", nargs="?", help="YAML config (see configs/); omit with --resume")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 sparsity.targets=0.3")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--run-dir", metavar="DIR", help="write the run here instead of tracking.out_dir/NAME-TIME")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import format_report, run

    overrides = list(args.overrides)
    if args.resume:
        if args.config is not None:
            if "=" not in args.config:
                raise CSparseError("--resume takes no config file (the run directory holds it); pass only key=value")
            overrides.insert(0, args.config)
        result = run(resume=args.resume, overrides=overrides)
    else:
        if args.config is None:
            raise CSparseError("train needs a CONFIG file (or --resume RUN_DIR)")
        cfg = load_config(args.config, overrides)
        result = run(cfg, run_dir=args.run_dir)
    print(format_report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CSparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
