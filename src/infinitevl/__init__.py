"""InfiniteVL: constant-memory vision-language model (hybrid Gated DeltaNet + sliding-window attention)."""
from .model import InfiniteVL, InfiniteVLConfig, InferenceState, preset
from .hf import register as _register_with_transformers

_register_with_transformers()  # AutoConfig / AutoModelForCausalLM / AutoProcessor find InfiniteVL checkpoints

__all__ = ["InfiniteVL", "InfiniteVLConfig", "InferenceState", "preset"]
__version__ = "0.1.0"
