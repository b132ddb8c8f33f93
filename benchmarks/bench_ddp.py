"""One process x 2 threads against 2 processes x 1 thread (torchrun, gloo), constrained L0.

1. Throughput: ``csparse train CONFIG`` in one process with ``--threads`` threads, and under
   ``torchrun --nproc_per_node=N`` with ``threads / N`` threads each, alternated ``--rounds``
   times, ``--epochs`` epochs each; seconds per epoch from each run's log (the training
   epoch, evaluation excluded), examples per second = training examples / that.
2. Communication share of a step: N spawned ranks build the config's trainer and time
   ``--steps`` training steps as trained (DDP's gradient all-reduce and the per-step
   agreement on stops) and the same steps with DDP's ``no_sync`` and no agreement,
   interleaved over ``--rounds``; share = 1 - local / full.
3. All-reduce volume per step for the MLP and LeNet-5 configs: the gradients DDP averages
   (4 bytes per trainable parameter) plus the agreement (8 bytes per rank + 8).

    python benchmarks/bench_ddp.py --threads 2 --epochs 3 --rounds 2

Writes ``benchmarks/out/ddp.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _report
import torch

ROOT = Path(__file__).resolve().parents[1]


def _epoch_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["time/epoch_s"] for r in rows if "train/loss" in r]


def _train(config: str, procs: int, threads: int, epochs: int, run_dir: Path, root: str | None) -> list[float]:
    overrides = [*_report.run_overrides(epochs, threads, None, root), "finish.enabled=false"]
    if procs == 1:
        cmd = [sys.executable, "-m", "constrained_sparsity", "train", config, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        cmd += ["-m", "constrained_sparsity", "train", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*cmd, "--run-dir", str(run_dir), "--overwrite"], check=True, env=env, capture_output=True)
    return _epoch_seconds(run_dir)


def _comm_worker(rank, world, port, config, threads, steps, rounds, root, out):  # type: ignore[no-untyped-def]
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)},
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    import constrained_sparsity as cs
    from constrained_sparsity import distributed
    from constrained_sparsity.data import batches
    from constrained_sparsity.problem import train_step
    from constrained_sparsity.training.build import build_trainer, dataset_for

    cfg = cs.load_config(config, [f"data.root={root}"] if root else [])
    ctx, device = distributed.from_environment(torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)
    dataset = dataset_for(cfg)
    model, _methods, problem, optimizers = build_trainer(cfg, dataset, device)
    ddp = distributed.wrap(model, ctx)
    problem.forward_module = ddp
    gen = torch.Generator().manual_seed(0)
    data = []
    for xb, yb in batches(dataset.train_x, dataset.train_y, cfg.data.batch_size, gen):
        if len(yb) == cfg.data.batch_size:
            data.append(distributed.shard(xb, yb, ctx))
        if len(data) >= steps:
            break

    def timed(sync: bool) -> float:
        start = time.perf_counter()
        for xb, yb, weight in data:
            problem.batch_weight = weight
            if sync:
                result = train_step(problem, optimizers, xb, yb)
                distributed.agree(ctx, device, not bool(torch.isfinite(result["loss"])), None)
            else:
                with ddp.no_sync():
                    result = train_step(problem, optimizers, xb, yb)
                bool(torch.isfinite(result["loss"]))
        return (time.perf_counter() - start) / len(data)

    timed(True)  # warm-up
    timed(False)
    full, local = [], []
    for _ in range(rounds):
        ctx.barrier()
        full.append(timed(True))
        ctx.barrier()
        local.append(timed(False))
    if ctx.main:
        Path(out).write_text(json.dumps({"full": full, "local": local}))
    distributed.shutdown()


def _comm_share(config: str, procs: int, threads: int, steps: int, rounds: int, root: str | None, out: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (config, threads, steps, rounds, root, str(out))
    workers = [ctx.Process(target=_comm_worker, args=(r, procs, port, *args)) for r in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if any(w.exitcode for w in workers):
        raise RuntimeError(f"communication timing failed: exit codes {[w.exitcode for w in workers]}")
    times = json.loads(out.read_text())
    full, local = statistics.median(times["full"]), statistics.median(times["local"])
    return {"step_s": full, "step_no_communication_s": local, "share": 1 - local / full}


def _volume(config: str, world: int, root: str | None) -> dict:
    import constrained_sparsity as cs
    from constrained_sparsity.training.build import build_trainer, dataset_for

    cfg = cs.load_config(config, [f"data.root={root}"] if root else [])
    model, *_ = build_trainer(cfg, dataset_for(cfg), torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grad_bytes = 4 * params
    flags = 8 * (world + 1)
    return {
        "trainable_parameters": params,
        "gradient_bytes": grad_bytes,
        "agreement_bytes": flags,
        "ring_bytes_sent_per_rank": 2 * (world - 1) / world * (grad_bytes + flags),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fashion_mlp_l0_constrained")
    parser.add_argument(
        "--volume-configs", nargs="+", default=["fashion_mlp_l0_constrained", "fashion_lenet_l0_constrained"]
    )
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=2, help="threads in all: one process gets all, N get threads/N each"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="steps per timing of the communication share")
    parser.add_argument("--root", default=None, help="data.root: a directory with the Fashion-MNIST IDX files")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = parser.parse_args(argv)
    if args.threads % args.procs:
        parser.error("--threads should be a multiple of --procs")
    out = Path(args.out)
    runs = out / "ddp"
    runs.mkdir(parents=True, exist_ok=True)
    per_proc = args.threads // args.procs
    import constrained_sparsity as cs
    from constrained_sparsity.training.build import dataset_for

    cfg = cs.load_config(args.config, [f"data.root={args.root}"] if args.root else [])
    examples = len(dataset_for(cfg).train_y)
    seconds: dict[str, list[float]] = {"one": [], "many": []}
    for r in range(args.rounds):
        seconds["one"] += _train(args.config, 1, args.threads, args.epochs, runs / f"one-{r}", args.root)
        seconds["many"] += _train(args.config, args.procs, per_proc, args.epochs, runs / f"many-{r}", args.root)
        print(f"[ddp] round {r + 1}: {seconds}", file=sys.stderr, flush=True)
    epoch = {k: statistics.median(v) for k, v in seconds.items()}
    comm = _comm_share(args.config, args.procs, per_proc, args.steps, args.rounds * 3, args.root, runs / "comm.json")
    report = {
        **_report.header(args.threads),
        "config": args.config,
        "global_batch": cfg.data.batch_size,
        "examples": examples,
        "epoch_s": {
            f"1 process x {args.threads} threads": epoch["one"],
            f"{args.procs} processes x {per_proc} thread(s)": epoch["many"],
        },
        "examples_per_s": {
            f"1 process x {args.threads} threads": examples / epoch["one"],
            f"{args.procs} processes x {per_proc} thread(s)": examples / epoch["many"],
        },
        "epoch_s_all": seconds,
        "communication": comm,
        "volume": {c: _volume(c, args.procs, args.root) for c in args.volume_configs},
    }
    lines = [*_report.markdown_header(report), "", "| setting | s / epoch (median) | examples / s |", "|---|---|---|"]
    for key, value in report["epoch_s"].items():
        lines.append(f"| {key} | {value:.2f} | {report['examples_per_s'][key]:.0f} |")
    lines += [
        "",
        f"Step of {args.procs} ranks x {per_proc} thread(s) (global batch {cfg.data.batch_size}): "
        f"{1e3 * comm['step_s']:.2f} ms, {1e3 * comm['step_no_communication_s']:.2f} ms without the gradient "
        f"all-reduce and the agreement: communication **{100 * comm['share']:.0f} %** of a step.",
        "",
        "| config | trainable parameters | all-reduced per step | sent per rank (ring) |",
        "|---|---|---|---|",
    ]
    for name, v in report["volume"].items():
        lines.append(
            f"| {name} | {v['trainable_parameters']:,} | {v['gradient_bytes'] / 1e6:.2f} MB + {v['agreement_bytes']} B "
            f"| {v['ring_bytes_sent_per_rank'] / 1e6:.2f} MB |"
        )
    _report.write(out, "ddp", report, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
