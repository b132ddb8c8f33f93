import os

import pytest
import torch

# Tests never touch the network: W&B runs are offline or disabled.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def quiet(tmp_path):
    """Overrides that keep a run in tmp_path, without W&B and without a progress bar."""
    return ["tracking.wandb=disabled", "tracking.progress=false", f"tracking.out_dir={tmp_path / 'runs'}"]


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the machine has: the CPU always, CUDA where present (skipped otherwise)."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def benchmark_module():
    """Import a script of benchmarks/ by name (its folder on sys.path while the module's tests run)."""
    import importlib
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(folder)
