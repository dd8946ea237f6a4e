"""headprune: prune the attention heads of Transformer models.

    from headprune import PruneConfig, prune
    results = prune(PruneConfig(model="runs/finetune/model", k=24, mode="pipelined"))

The building blocks, for your own loop: `attach_gates(model)` puts one gate on every head,
`gates.selector = make_selector("dsp", gates.num_heads, k, ...)` makes them learn exactly k.

The names below are imported when first used, so that `import headprune` (and the command line's
`--help`) does not load torch and transformers until they are needed. No exported name is also a
module's (`headprune.sweep` is the function; the module is `sweeping`): importing a submodule sets
the package's attribute of its name, which would replace the function with the module.
"""

from importlib import import_module

__version__ = "0.1.0"

_WHERE = {
    "FinetuneConfig": "config", "PruneConfig": "config", "SweepConfig": "config", "MeasureConfig": "config",
    "ExportConfig": "config",
    "HeadGates": "gates", "attach_gates": "gates", "detach_gates": "gates", "get_gates": "gates",
    "DSPSelector": "methods", "hard_top_k": "methods", "make_selector": "methods", "soft_top_k": "methods",
    "load_pruned": "pruning", "remove_heads": "pruning", "save_pruned": "pruning", "zero_pruned_heads": "pruning",
    "demo": "recipes", "finetune": "recipes", "prune": "recipes", "sweep": "sweeping",
    "reconstruct": "reconstruction", "export_onnx": "export", "measure": "measuring", "HeadPruningCallback": "integrations",
    "AttentionSite": "sites", "find_sites": "sites",
    "HeadpruneError": "errors", "PrunedCheckpointError": "errors", "UnsupportedArchitectureError": "errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'headprune' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])
