"""How much of the constrained-L0 step's overhead over dense is Cooper, and what torch.compile does (issue 2).

    python benchmarks/probe_l0_overhead.py DENSE_RUN_DIR CONSTRAINED_RUN_DIR [--threads 2] [--compile]

Rebuilds both trainers at their end state (as ``profile_l0_step.py`` does) and times, in
interleaved rounds on the same batches, milliseconds per step of:

* ``cooper``: the library's ``train_step`` (Cooper's ``roll``, then dual restarts);
* ``by hand``: the same mathematics without Cooper: forward, cross-entropy plus
  ``lambda * expected density``, one ``backward()``, the primal Adam step, and the run's
  dual optimizer stepped on the exact density's violation (then projected to >= 0, and
  restarted when the budget is met); the dense row is forward, loss, backward, Adam;
* with ``--compile``: the forward and backward pass alone, eager and under
  ``torch.compile`` (inductor; needs a C++ compiler; the compile time is printed).

The by-hand step is a measuring stick only: the trainer uses Cooper.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import _report
import torch
import torch.nn.functional as F

import constrained_sparsity as cs


def _build(run_dir: str):  # type: ignore[no-untyped-def]
    cfg, dataset, model, gates, problem, optimizers = _report.rebuild_trainer(run_dir)
    return cfg, model, gates, problem, optimizers, _report.train_batches(dataset, cfg.data.batch_size)


def _by_hand(setup) -> Callable[[int], None]:  # type: ignore[no-untyped-def]
    _, model, gates, problem, optimizers, data = setup
    primal = optimizers.cooper_optimizer.primal_optimizers[0]
    pairs = problem.ordered_constraints()
    if not pairs:

        def dense_step(i: int) -> None:
            x, y = data[i % len(data)]
            primal.zero_grad()
            F.cross_entropy(model(x), y).backward()
            primal.step()

        return dense_step
    ((target, constraint),) = pairs
    lam = constraint.multiplier.weight
    dual = optimizers.dual_optimizer  # the run's own (maximize=True)

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        primal.zero_grad()
        loss = F.cross_entropy(model(x), y)
        expected, exact = gates.densities()
        lam.grad = (exact - target.epsilon).reshape(1)  # d(lambda * strict violation) / d lambda
        dual.step()
        with torch.no_grad():
            lam.clamp_(min=0)
            if exact < target.epsilon:  # dual restart
                lam.zero_()
                dual.state.pop(lam, None)
        (loss + lam.detach()[0] * expected).backward()
        primal.step()

    return step


def _cooper(setup) -> Callable[[int], None]:  # type: ignore[no-untyped-def]
    cfg, _, _, problem, optimizers, data = setup
    return lambda i: cs.train_step(problem, optimizers, *data[i % len(data)], cfg.sparsity.dual_restarts)


def _forward_backward(model: torch.nn.Module, data: list) -> Callable[[int], None]:
    def fb(i: int) -> None:
        x, y = data[i % len(data)]
        F.cross_entropy(model(x), y).backward()

    return fb


def main() -> int:
    args = _report.probe_args(__doc__, "constrained_run", "also time forward+backward under torch.compile")
    dense, constrained = _build(args.dense_run), _build(args.constrained_run)
    ms = _report.interleaved_ms(
        {
            "dense, cooper": _cooper(dense),
            "dense, by hand": _by_hand(dense),
            "constrained, cooper": _cooper(constrained),
            "constrained, by hand": _by_hand(constrained),
        },
        args.rounds,
        args.steps,
    )
    print(f"ms per training step, median of {args.rounds} interleaved rounds of {args.steps} steps:")
    for name, value in ms.items():
        print(f"  {name:24s} {value:7.3f}")
    print(
        f"  constrained / dense: cooper {ms['constrained, cooper'] / ms['dense, cooper']:.3f}, "
        f"by hand {ms['constrained, by hand'] / ms['dense, by hand']:.3f}"
    )
    if args.compile:
        fns = {}
        for label, setup in (("dense", dense), ("constrained", constrained)):
            model, data = setup[1], setup[5]
            fns[f"{label}, eager"] = _forward_backward(model, data)
            compiled = torch.compile(model)
            t0 = time.perf_counter()
            _forward_backward(compiled, data)(0)
            print(f"torch.compile of the {label} model: first call {time.perf_counter() - t0:.1f} s")
            fns[f"{label}, compiled"] = _forward_backward(compiled, data)
        ms = _report.interleaved_ms(fns, args.rounds, args.steps)
        print("ms per forward + backward pass:")
        for name, value in ms.items():
            print(f"  {name:24s} {value:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
