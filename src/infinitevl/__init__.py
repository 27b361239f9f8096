"""InfiniteVL: constant-memory vision-language model (hybrid Gated DeltaNet + sliding-window attention)."""
from .model import InfiniteVL, InfiniteVLConfig, InferenceState, preset

__all__ = ["InfiniteVL", "InfiniteVLConfig", "InferenceState", "preset"]
__version__ = "0.1.0"
