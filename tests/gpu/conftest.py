import pytest

from infinitevl.ops.backend import fla_available

_OK, _WHY = fla_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"GPU fast path unavailable: {_WHY} (run on the device machine with the gpu extra)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not _OK:
                item.add_marker(skip)
