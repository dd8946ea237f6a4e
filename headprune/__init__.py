"""headprune: prune the attention heads of Transformer models."""

from .gates import HeadGates, attach_gates, detach_gates, get_gates
from .methods import DSPSelector, hard_top_k, make_selector, soft_top_k
from .sites import AttentionSite, UnsupportedArchitectureError, find_sites

__version__ = "0.1.0"

__all__ = [
    "AttentionSite", "DSPSelector", "HeadGates", "UnsupportedArchitectureError", "attach_gates",
    "detach_gates", "find_sites", "get_gates", "hard_top_k", "make_selector", "soft_top_k",
]
