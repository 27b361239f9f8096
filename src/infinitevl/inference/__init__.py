"""Inference on top of the model: sampling and generation loops."""
from .generate import generate, prefill
from .sampling import SamplingParams, sample

__all__ = ["generate", "prefill", "sample", "SamplingParams"]
