"""Gated delta rule ops. `reference` is plain PyTorch (CPU or GPU); fast kernels plug in beside it."""
from .reference import chunk_gated_delta_rule, l2norm, mask_padding, recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "l2norm", "mask_padding"]
