"""A clear stop for GPU-only benchmark scripts on a machine without what they need (a CUDA GPU, Triton, fla):
`--help` shows the script's docstring and what it needs; a run ends with `error:` and exit code 2 instead of an
import traceback or a "Torch not compiled with CUDA" error deep inside."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def require(doc: str | None, *modules: str) -> None:
    import torch

    missing = ([] if torch.cuda.is_available() else ["a CUDA GPU"]) + [
        m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    name = Path(sys.argv[0]).name
    need = f"{name} needs {' and '.join(missing)}: run it on a GPU machine after pip install -e \".[gpu]\""
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(f"{(doc or '').strip()}\n\n{need}")
        sys.exit(0)
    print(f"error: {need}", file=sys.stderr)
    sys.exit(2)
