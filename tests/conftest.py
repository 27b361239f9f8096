import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INFINITEVL_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
REFERENCE_TINY = FIXTURES / "reference-tiny"
MEDIA = FIXTURES / "media"
QWEN_TOKENIZER = FIXTURES / "qwen2.5-vl-tokenizer"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
