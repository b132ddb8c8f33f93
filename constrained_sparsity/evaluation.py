"""Measuring a network: classification error, output differences and latency.

Works on ``nn.Module`` s and on ``torch.export`` programs' modules (which refuse mode
changes). Inputs follow the network's device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from .data import batches
from .graph import model_device, model_dtype

__all__ = ["error_rate", "max_output_difference", "measure_latency", "set_training"]


def set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)``; a no-op for a ``torch.export`` program, which refuses mode changes."""
    try:
        model.train(mode)
    except NotImplementedError:
        pass


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Classification error of ``model`` in eval mode (test-time gates); the mode is restored.

    Also takes a ``torch.export`` program's module, which stays in the mode it was traced in.
    """
    was_training = model.training
    set_training(model, False)
    wrong = 0
    try:
        for xb, yb in batches(x, y, batch_size):
            wrong += int((model(xb).argmax(dim=1) != yb).sum())
    finally:
        set_training(model, was_training)
    return wrong / max(len(y), 1)


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> float:
    """The largest ``|a(x) - b(x)|`` over the inputs ``x`` (both networks in their current mode)."""
    diff = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        diff = max(diff, float((a(xb) - b(xb)).abs().max()))
    return diff


def measure_latency(
    model: nn.Module, input_shape: Sequence[int], batch: int, threads: int, repeats: int = 30, warmup: int = 5
) -> float:
    """Median seconds of one forward pass (eval mode, no autograd) at ``batch`` on ``threads``.

    The input lives on the network's device; on a GPU each pass is synchronised.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = model_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        set_training(model, False)
        x = torch.rand(batch, *input_shape, device=device, dtype=model_dtype(model))
        times = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        torch.set_num_threads(previous)
