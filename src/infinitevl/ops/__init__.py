"""Functional kernels: tensors in, tensors out, no config objects."""
