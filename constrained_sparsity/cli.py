"""Command line: ``csparse train CONFIG [key=value ...]`` and ``csparse train --resume RUN_DIR``.

Exit codes: 0 success, 1 the run failed (diverged), 2 bad input (config or data),
128 + signal number after SIGINT / SIGTERM (a checkpoint was written first).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import CSparseError, TrainingDiverged, TrainingInterrupted

__all__ = ["main"]

MAX_EVAL_BATCH = 1 << 16  # latency batches: larger ones time memory traffic, not the network


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's one-line errors (exit code 2)."""

    def error(self, message: str):  # type: ignore[no-untyped-def, override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="csparse", description="Train sparse neural networks to a declared sparsity budget.")
    parser.add_argument("--version", action="version", version=f"csparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a network as a YAML config declares")
    train.add_argument(
        "config", nargs="?", help="a YAML config file or a shipped config's name (csparse configs); not with --resume"
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 sparsity.targets=0.3")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    train.add_argument("--run-dir", metavar="DIR", help="write the run here instead of tracking.out_dir/NAME-TIME")
    train.add_argument(
        "--overwrite", action="store_true", help="with --run-dir: start over in a directory that holds a run"
    )
    cmp = sub.add_parser("compare", help="penalised vs constrained training, side by side, for one method or several")
    cmp.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG",
        help="YAML config(s), one method each (several: one joint table and plot), then key=value overrides "
        "applied to every run",
    )
    cmp.add_argument(
        "--methods",
        nargs="+",
        default=[],
        metavar="NAME",
        help="compare these methods on the one CONFIG (each run with sparsity.method=NAME)",
    )
    cmp.add_argument(
        "--targets",
        nargs="+",
        required=True,
        metavar="EPS",
        help="budgets: densities for L0 (a comma-separated list for per-layer targets), layer counts for layers",
    )
    cmp.add_argument("--lambdas", nargs="*", default=[], metavar="LAM", help="penalised λ grid")
    cmp.add_argument("--bisect", action="store_true", help="search the λ that lands on each target")
    cmp.add_argument(
        "--search",
        choices=["joint", "per-budget"],
        default="joint",
        help="with --bisect: one search for every target, each run informing all (default), or a bisection per "
        "target (always for per-layer targets and for methods whose penalised runs prune to the target)",
    )
    cmp.add_argument("--tol", type=float, default=None, help="search tolerance on the measure (L0: 0.01)")
    cmp.add_argument(
        "--max-runs", type=int, default=8, help="search budget: runs per target (joint: this times the targets)"
    )
    cmp.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    cmp.add_argument(
        "--threads", type=int, default=None, help="threads per training (default with --jobs N: the cores / N)"
    )
    cmp.add_argument(
        "--lambda-range",
        nargs=2,
        type=float,
        default=None,
        metavar=("LO", "HI"),
        help="bisection bracket for λ (default: the method's own; L0 1e-3 1e2, CGES 1e-6 1e-1)",
    )
    cmp.add_argument("--out", metavar="DIR", help="comparison directory (default: tracking.out_dir/compare-NAME-TIME)")
    cmp.add_argument(
        "--overwrite", action="store_true", help="start over in an --out directory that holds a comparison"
    )
    comp = sub.add_parser("compact", help="write the smaller dense network of a run (state_dict + torch.export)")
    comp.add_argument("run_dir", help="a run directory")
    comp.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/compact)")
    comp.add_argument(
        "--keep-inputs", action="store_true", help="keep the first linear layer's zero input columns (no SelectInputs)"
    )
    comp.add_argument(
        "--fold-batchnorm",
        action="store_true",
        help="an inference network: fold each BatchNorm into the Conv2d / Linear it alone reads",
    )
    cfgs = sub.add_parser("configs", help="list the shipped configs, or print one (csparse configs show NAME)")
    cfgs.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    cfgs.add_argument("name", nargs="?", help="with show: the config's name")
    ev = sub.add_parser("eval", help="test error, parameters, FLOPs and latency of a run or a compact model")
    ev.add_argument("path", help="a run directory, or a compact model.pt / model.pt2")
    ev.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    ev.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ev.add_argument("--repeats", type=int, default=30)
    return parser


def _configs(args: argparse.Namespace) -> int:
    import yaml

    from .config import config_from_dict, describe_config, read_config_dict, shipped_configs

    shipped = shipped_configs()
    if args.action == "list":
        if args.name is not None:
            raise CSparseError("csparse configs takes no name; csparse configs show NAME prints one")
        width = max(map(len, shipped), default=0)
        for name, path in shipped.items():
            print(f"{name:<{width}}  {describe_config(path)}")
        return 0
    if args.name is None:
        raise CSparseError("csparse configs show needs a NAME (csparse configs lists them)")
    if args.name not in shipped:
        raise CSparseError(f"no shipped config named {args.name!r}; csparse configs lists them")
    resolved = config_from_dict(read_config_dict(shipped[args.name])).to_dict()
    print(f"# {args.name}: {describe_config(shipped[args.name])} (resolved: every setting, defaults included)")
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from .runs import compact_run, format_compact_report

    report = compact_run(args.run_dir, args.out, select_inputs=not args.keep_inputs, fold_batchnorm=args.fold_batchnorm)
    print(format_compact_report(report))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .runs import evaluate, format_eval

    if any(b <= 0 for b in args.batches) or any(t <= 0 for t in args.threads) or args.repeats <= 0:
        raise CSparseError("--batches, --threads and --repeats take positive integers")
    if max(args.batches) > MAX_EVAL_BATCH or max(args.threads) > 1024:
        raise CSparseError(f"--batches at most {MAX_EVAL_BATCH}, --threads at most 1024")
    print(format_eval(evaluate(args.path, args.batches, args.threads, args.repeats)))
    return 0


def _split_overrides(values: list[str], overrides: list[str]) -> list[str]:
    """``key=value`` items argparse took as values of a list option go back to the overrides."""
    overrides.extend(v for v in values if "=" in v)
    return [v for v in values if "=" not in v]


def _method_overrides(spec: str) -> list[str]:
    """``--methods NAME``: the config's runs with that method, in a mode it has (compare sets
    the mode of each run; a method without a penalty runs projected)."""
    from .methods import get_method

    try:
        cls = get_method(spec)
    except ValueError as exc:
        raise CSparseError(f"--methods {spec}: {exc}") from None
    return [f"sparsity.method={spec}", f"sparsity.mode={cls.spec.budget_mode}"]


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, parse_budget, parse_lambda
    from .config import load_config

    overrides = [v for v in args.configs if "=" in v]
    paths = [v for v in args.configs if "=" not in v]
    targets = _split_overrides(args.targets, overrides)
    lambdas = [parse_lambda(v) for v in _split_overrides(args.lambdas, overrides)]
    methods = _split_overrides(args.methods, overrides)
    if not targets:
        raise CSparseError("--targets: give at least one budget")
    if not paths:
        raise CSparseError("compare needs a CONFIG")
    if methods and len(paths) > 1:
        raise CSparseError("--methods runs on one CONFIG; with several configs, each names its method")
    budgets = [parse_budget(t) for t in targets]
    options = dict(
        lambdas=lambdas,
        bisect=args.bisect,
        tol=args.tol,
        max_runs=args.max_runs,
        lambda_range=tuple(args.lambda_range) if args.lambda_range else None,
        out_dir=args.out,
        overwrite=args.overwrite,
        search=args.search,
        jobs=args.jobs,
        threads=args.threads,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    if methods or len(paths) > 1:
        from .compare import compare_methods

        cfgs = (
            [load_config(paths[0], [*overrides, *_method_overrides(m)]) for m in methods]
            if methods
            else [load_config(p, overrides) for p in paths]
        )
        joint = compare_methods(cfgs, budgets, **options)
        print((joint.out_dir / "results.md").read_text())
        print(f"comparison directory: {joint.out_dir} (plot: {joint.plot.name}; one directory per method)")
        return 0
    cfg = load_config(paths[0], overrides)
    result = compare(cfg, budgets, **options)
    print((result.out_dir / "results.md").read_text())
    print(f"comparison directory: {result.out_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import load_config, resolve_config
    from .training import format_report, run

    overrides = list(args.overrides)
    if args.resume:
        if args.run_dir or args.overwrite:
            raise CSparseError("--resume continues the run in its own directory; it takes no --run-dir or --overwrite")
        if args.config is not None:
            if "=" not in args.config:
                raise CSparseError("--resume takes no config file (the run directory holds it); pass only key=value")
            overrides.insert(0, args.config)
        result = run(resume=args.resume, overrides=overrides)
    else:
        if args.config is None:
            raise CSparseError("train needs a CONFIG file or name (or --resume RUN_DIR)")
        path, source = resolve_config(args.config)
        if _main_rank():
            print(f"config: {path}" + (f" (the shipped config {path.stem})" if source == "shipped" else ""), flush=True)
        cfg = load_config(path, overrides)
        result = run(cfg, run_dir=args.run_dir, overwrite=args.overwrite)
    if _main_rank():
        print(format_report(result))
    return 0


def _main_rank() -> bool:
    """Whether this process prints (rank 0 under torchrun; always in one process)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _warning_line  # one line per warning, as for errors
    args = _parser().parse_args(argv)
    from . import distributed

    try:
        if distributed.launched() and args.command != "train":
            raise CSparseError(f"{args.command} runs in one process; under torchrun only `train` runs")
        if args.command == "train":
            return _train(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "compact":
            return _compact(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "configs":
            return _configs(args)
    except TrainingInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CSparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
