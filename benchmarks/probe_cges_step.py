"""Where a CGES training step's time over dense goes, and the least its proximal step can cost (issue 17).

    python benchmarks/probe_cges_step.py DENSE_RUN_DIR CGES_RUN_DIR [--threads 2] [--compile]

Rebuilds both trainers at their end state (as ``bench_cges_fashion``'s interleaved timing
does) and times, in interleaved rounds on the same batches, milliseconds per step of:

* ``dense step`` / ``CGES step``: the library's ``train_step`` of each run; ``CGES step
  without prox``: the same on a second copy of the CGES trainer with its proximal step
  switched off (the constrained game's forward, measure, Lagrangian and dual step alone);
* ``prox``: the CGES run's proximal step alone (group, then exact exclusive, every layer) at
  a strength of the configured primal learning rate x the run's last multiplier, on its end
  weights (restored before each call, so that they do not drift; the restore is timed alone
  and subtracted);
* ``measure``: the exact density that moves the multiplier;
* ``one pass``: one elementwise pass over the same weights (``abs`` into a buffer): the prox
  must read every weight once and write it once, and the exact exclusive prox reads it again
  per Newton iteration, so a few of these are its floor in PyTorch's eager operations;
* with ``--compile``: the same prox with each pass fused by ``torch.compile`` (inductor;
  needs a C++ compiler; the compile time is printed) -- a measuring stick only, the method
  runs eager operations.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import _report
import torch

import constrained_sparsity as cs
from constrained_sparsity.methods import cges


def _fused_prox() -> Callable[[torch.Tensor, float, float], None]:
    """The combined prox of one layer's groups (in place) with every pass a compiled kernel."""

    def norms(g: torch.Tensor) -> torch.Tensor:
        return g.square().sum(dim=1, keepdim=True).sqrt()

    def stats(g: torch.Tensor, scale: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = (g.abs() * scale - theta).clamp_min(0.0)
        return r.sum(dim=1, keepdim=True), (r > 0).sum(dim=1, keepdim=True, dtype=g.dtype)

    def write(g: torch.Tensor, scale: torch.Tensor, theta: torch.Tensor) -> None:
        g.copy_(torch.copysign((g.abs() * scale - theta).clamp_min(0.0), g))

    c_norms, c_stats, c_write = (torch.compile(f, dynamic=True, fullgraph=True) for f in (norms, stats, write))

    def prox(g: torch.Tensor, t_group: float, t_excl: float) -> None:
        n = c_norms(g)
        scale = 1.0 - t_group / n.clamp_min(t_group) if t_group > 0 else torch.ones_like(n)
        theta, size = torch.zeros_like(n), None
        for _ in range(g.shape[1] + 2):  # the Newton iteration of cges.exclusive_prox
            s, count = c_stats(g, scale, theta)
            if size is not None and torch.equal(count, size):
                break
            theta, size = t_excl * (s + count * theta) / (1.0 + t_excl * count), count
        c_write(g, scale, theta)

    return prox


def main() -> int:
    args = _report.probe_args(__doc__, "cges_run", "also time the prox with torch.compile'd passes")
    runs = {}
    for label, run_dir in (("dense", args.dense_run), ("CGES", args.cges_run), ("no prox", args.cges_run)):
        cfg, dataset, _, method, problem, optimizers = _report.rebuild_trainer(run_dir)
        runs[label] = (cfg, problem, optimizers, _report.train_batches(dataset, cfg.data.batch_size), method)
    cfg, problem, optimizers, _, method = runs["CGES"]
    if not isinstance(method, cges.CGES):
        raise SystemExit(f"{args.cges_run} is not a CGES run")
    runs["no prox"][4].proximal_step_ = lambda target, strength: None  # a second trainer, its prox a no-op
    ((target, constraint),) = problem.ordered_constraints()
    lam = float(constraint.multiplier.weight.detach()[0])
    strength = cfg.optim.primal.lr * lam
    layers = method._select(target.layers)
    saved = [layer.weight.detach().clone() for layer in layers]
    buffers = [torch.empty_like(w) for w in saved]

    def step(label: str) -> Callable[[int], None]:
        cfg_, problem_, optimizers_, data, _ = runs[label]
        return lambda i: cs.train_step(problem_, optimizers_, *data[i % len(data)], cfg_.sparsity.dual_restarts)

    def restore() -> None:
        with torch.no_grad():
            for layer, w in zip(layers, saved):
                layer.weight.copy_(w)

    def prox(i: int) -> None:
        restore()
        method.proximal_step_(target, strength)

    def one_pass(i: int) -> None:
        for layer, buf in zip(layers, buffers):
            torch.abs(layer.weight.detach(), out=buf)

    fns = {
        "dense step": step("dense"),
        "CGES step": step("CGES"),
        "CGES step without prox": step("no prox"),
        "prox (restore + prox)": prox,
        "restore alone": lambda i: restore(),
        "measure": lambda i: method._measure(target.layers),
        "one pass": one_pass,
    }
    if args.compile:
        fused = _fused_prox()

        def fused_prox(i: int) -> None:
            restore()
            with torch.no_grad():
                for layer in layers:
                    w = layer.weight.detach()
                    groups = cges.to_groups(w, method.grouping)
                    c = groups.shape[1] ** 0.5 if method.group_weight == "sqrt" else 1.0  # as CGES.proximal_step_
                    fused(groups, strength * layer.mu * c, strength * (1.0 - layer.mu))
                    if groups.data_ptr() != w.data_ptr():  # a copy (convolutions), not a view
                        w.copy_(cges.from_groups(groups, w, method.grouping))

        t0 = time.perf_counter()
        fused_prox(0)
        print(f"torch.compile of the fused prox: first call {time.perf_counter() - t0:.1f} s")
        fns["fused prox (restore + prox)"] = fused_prox
    ms = _report.interleaved_ms(fns, args.rounds, args.steps)
    restore()
    sizes = ", ".join(f"{layer.name} {tuple(layer.weight.shape)}" for layer in layers)
    print(f"CGES layers: {sizes}; prox strength {strength:.4g} (lambda {lam:.4g})")
    print(f"ms per step, median of {args.rounds} interleaved rounds of {args.steps} steps:")
    for name, value in ms.items():
        print(f"  {name:28s} {value:7.3f}")
    dense = ms["dense step"]
    prox_ms = ms["prox (restore + prox)"] - ms["restore alone"]
    print(f"  CGES step / dense step      {ms['CGES step'] / dense:7.3f}")
    print(f"  without prox / dense step   {ms['CGES step without prox'] / dense:7.3f}")
    print(f"  prox alone / dense step     {prox_ms / dense:7.3f}   ({prox_ms / ms['one pass']:.1f} passes)")
    print(f"  measure / dense step        {ms['measure'] / dense:7.3f}")
    print(f"  one pass / dense step       {ms['one pass'] / dense:7.3f}")
    if args.compile:
        fused_ms = ms["fused prox (restore + prox)"] - ms["restore alone"]
        print(f"  fused prox / dense step     {fused_ms / dense:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
