"""The model: config, explicit state, vision encoder, decoder, checkpoint IO."""
from .config import InfiniteVLConfig, TextConfig, VisionConfig, preset
from .infinitevl import InfiniteVL
from .state import GDNState, InferenceState, SWAState

__all__ = ["InfiniteVL", "InfiniteVLConfig", "TextConfig", "VisionConfig", "preset", "InferenceState",
           "GDNState", "SWAState"]
