"""headprune: prune the attention heads of Transformer models.

    from headprune import PruneConfig, prune
    results = prune(PruneConfig(model="runs/finetune/model", k=24, mode="pipelined"))

The building blocks, for your own loop: `attach_gates(model)` puts one gate on every head,
`gates.selector = make_selector("dsp", gates.num_heads, k, ...)` makes them learn exactly k.
"""

from .config import FinetuneConfig, PruneConfig
from .gates import HeadGates, attach_gates, detach_gates, get_gates
from .methods import DSPSelector, hard_top_k, make_selector, soft_top_k
from .pruning import PrunedCheckpointError, load_pruned, remove_heads, save_pruned, zero_pruned_heads
from .recipes import demo, finetune, prune
from .sites import AttentionSite, UnsupportedArchitectureError, find_sites

__version__ = "0.1.0"

__all__ = [
    "AttentionSite", "DSPSelector", "FinetuneConfig", "HeadGates", "PruneConfig", "PrunedCheckpointError",
    "load_pruned", "remove_heads", "save_pruned",
    "UnsupportedArchitectureError", "attach_gates", "demo", "detach_gates", "find_sites", "finetune",
    "get_gates", "hard_top_k", "make_selector", "prune", "soft_top_k", "zero_pruned_heads",
]
