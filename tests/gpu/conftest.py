import pytest
import torch

from infinitevl.ops.backend import fla_available

_OK, _WHY = fla_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"GPU fast path unavailable: {_WHY} (run on the device machine with the gpu extra)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not _OK:
                item.add_marker(skip)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b in the 2-norm (float64)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
