"""The model card (README.md with the Hub's YAML header) written into every saved model folder:
what the model is, how it was made (the command), what it measured, and how to load it."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

from .config import TARGETS
from .outputs import atomic_path

PIPELINES = {"classification": "text-classification", "translation": "translation", "causal-lm": "text-generation"}
OFFLINE_BASES = {"offline:minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
                 "offline:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def command_of(command: str, cfg) -> str:
    """The `headprune` command line that gives `cfg`: every option that differs from its default."""
    parts = ["headprune", command]
    defaults = type(cfg)()  # as built, e.g. k filled in from its default
    budgets = ("k_per_kind", *TARGETS)
    targeted = any(getattr(cfg, t, None) is not None for t in TARGETS)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name) or (f.name == "k" and any(getattr(cfg, b, None) for b in budgets)) \
                or (f.name == "k_per_kind" and targeted):
            continue  # a default; or k, which --k-per-kind or a target gives; or the k per kind a target gives
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(_quoted(p) for p in parts)


def _quoted(part: str) -> str:
    return part if re.fullmatch(r"[\w@%+=:,./-]+", part) else "'" + part.replace("'", "'\"'\"'") + "'"


def base_model_of(name: str) -> str | None:
    """The hub id a model came from: an offline asset's source, a hub id, or what the card of a
    local folder says; None where nothing says."""
    if name in OFFLINE_BASES:
        return OFFLINE_BASES[name]
    card = Path(name).expanduser() / "README.md"
    if card.is_file():
        found = re.search(r"^base_model:\s*(\S+)\s*$", card.read_text(encoding="utf-8", errors="replace"), re.M)
        return found.group(1) if found else None
    from .tasks.base import looks_like_path
    return None if looks_like_path(name) else name


def calibration_data(results: dict) -> str | None:
    """What a run calibrated on (scores, reconstruction, mean ablation), as the report and card say
    it; None for a run that read no calibration data."""
    if "calibration_examples" not in results:
        return None
    config = results.get("config", {})
    what = f"blocks of {config.get('max_length')} tokens" if results.get("task") == "causal-lm" else "examples"
    return f"{results['calibration_examples']} {what} of {config.get('calibration_dataset') or 'the pruning data'}"


METRIC_NAMES = {"bleu": "BLEU"}  # as written, where capitalising the task's metric name is not


def baseline(results: dict) -> str:
    """What a pruned model is compared with: the unpruned model, or the input model pruned before."""
    return "input model (pruned before)" if results.get("pruned_before") else "unpruned"


def _metrics_table(results: dict) -> list[str]:
    before = results.get("metrics_unpruned") or {}
    after = results["metrics_pruned"] if "metrics_pruned" in results else results.get("metrics", {})
    middle = results.get("metrics_before_reconstruction")
    if not before and not middle:  # a fine-tuned model: nothing to compare with
        return ["| split | this model |", "|---|---|", *[f"| {split} | {value:.4f} |" for split, value in after.items()]]
    header = f"| split | {baseline(results)} | " + ("pruned, before reconstruction | " if middle else "") + "this model |"
    lines = [header, "|---|---|" + ("---|" if middle else "") + "---|"]
    for split, value in after.items():
        cells = [f"{before[split]:.4f}" if split in before else "", *([f"{middle[split]:.4f}"] if middle else []),
                 f"{value:.4f}"]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return lines


def _size_table(size: dict, against: str = "unpruned") -> list[str]:
    """The pruned model's size against the unpruned one's (`against`: what that is), as `prune`
    records it (parameters and cache from the shapes, attention FLOPs counted on a forward pass)."""
    before, after = size["unpruned"], size["pruned"]
    rows = [("parameters", "parameters"),
            ("attention_flops", f"attention FLOPs, one sequence of {size['length']} tokens"),
            ("kv_cache_bytes_per_token", "key/value cache, bytes per token")]
    lines = [f"| | {against} | this model | ratio |", "|---|---|---|---|"]
    lines += [f"| {label} | {before[key]:,} | {after[key]:,} | {after[key] / before[key]:.1%} |"
              for key, label in rows if before.get(key) and key in after]
    return lines


def budget_sentence(budget: dict) -> str:
    """A --target-* budget as asked, predicted and measured (a reader of the command alone would take
    the target for what the model reached)."""
    if budget["target"] == "speedup":  # timed on the machine the run ran on
        said = "{:.3g}x".format
        asked = f"a speedup of at least {said(budget['target_value'])} (on the machine that pruned it)"
    else:
        said = "{:,.0f}".format
        what = {"parameters": "parameters", "kv_cache_bytes_per_token": "bytes of key/value cache per token"}
        asked = (f"at most {said(budget['target_value'])} {what[budget['target']]} (the whole model: "
                 f"{said(budget['original'])})")
    measured = "not measured" if budget.get("measured") is None else said(budget["measured"])
    return f"Budget: {asked}; predicted {said(budget['predicted'])}, measured on this model {measured}."


SPEED_HEADER = "## Measured speed"


def with_measured_speed(card: str, table: str, command: str) -> str:
    """The card with its measured-speed section (what `headprune measure --card` printed) put in
    or replaced; the rest of the card unchanged."""
    section = f"{SPEED_HEADER}\n\nMeasured with:\n\n```\n{command}\n```\n\n{table.rstrip()}\n"
    start = card.find(SPEED_HEADER)
    if start < 0:
        return card.rstrip("\n") + "\n\n" + section
    end = card.find("\n## ", start + len(SPEED_HEADER))
    return card[:start] + section + (card[end:] if end >= 0 else "")


def model_card(results: dict, command: str, folder_name: str = "model") -> str:
    """The card of a model that `finetune` or `prune` saved, from its results."""
    base = base_model_of(results["model"])
    pruned = "kept_heads" in results
    tags = ["headprune"] + (["pruned", "attention-head-pruning", results["method"]] if pruned else [])
    header = ["---", "library_name: transformers", *([f"base_model: {base}"] if base else []),
              f"pipeline_tag: {PIPELINES.get(results['task'], results['task'])}", "tags:",
              *[f"- {tag}" for tag in tags], "---", ""]
    metric = results.get("metric", "accuracy")
    if not pruned:
        body = [f"# {results['task']} model fine-tuned with headprune", "",
                f"From `{results['model']}` on `{results['dataset']}`; {metric} ({'higher' if metric != 'perplexity' else 'lower'} "
                "is better):", "", *_metrics_table(results), "", "Made with:", "", "```", command, "```", "",
                "Load it with `transformers` (`AutoModelFor...from_pretrained`) or `headprune.load_pruned`.", ""]
        return "\n".join(header + body)
    unit = {"group": "KV groups", "query": "query positions"}.get(results.get("unit"), "heads")
    per_layer = Counter((kind, layer) for kind, layer, _ in results["kept_heads"])
    # every kind and layer, those that keep nothing too (results of before "layers": those up to the last kept)
    counts = results.get("layers") or {}
    kinds = list(counts) or list(dict.fromkeys(kind for kind, _ in sorted(per_layer)))
    layers = max([*counts.values(), *(1 + layer for _, layer in per_layer)], default=0)

    def cell(kind, i):  # a kind with fewer layers than another has no layer i
        return "–" if kind in counts and i >= counts[kind] else str(per_layer.get((kind, i), 0))
    body = [f"# {results['method']} {results['mode']}: {results['k']} of {results['num_heads']} {unit} kept", "",
            f"Attention heads pruned with headprune from `{results['model']}`"
            f"{f' ({base})' if base else ''} on `{results['dataset']}`: method `{results['method']}`, "
            f"{results['mode']}, unit `{results.get('unit', 'group')}`"
            + (f", reconstruction `{results['reconstruct']}`" if results.get("reconstruct") else "") + "."
            + (f" Calibration data: {calibration_data(results)}." if calibration_data(results) else "")
            + (f" {budget_sentence(results['budget'])}" if results.get("budget") else "")
            + (" The input model was pruned before: it is the baseline of the tables below."
               if results.get("pruned_before") else ""), "",
            f"{METRIC_NAMES.get(metric, metric.capitalize())}:", "", *_metrics_table(results), "",
            "Kept per layer (a layer that keeps none gives its output projection's bias):", "",
            "| kind | " + " | ".join(f"layer {i}" for i in range(layers)) + " |" if per_layer else "(no head kept)"]
    if per_layer:
        body.append("|---|" + "---|" * layers)
        for kind in kinds:
            body.append(f"| {kind} | " + " | ".join(cell(kind, i) for i in range(layers)) + " |")
    if results.get("size"):
        body += ["", "Size (`headprune measure --pruned <folder> --card` adds measured speed):", "",
                 *_size_table(results["size"], baseline(results))]
    zeroed = results.get("config", {}).get("save_format") == "zeroed"
    how = ("Load it with `from_pretrained` (the pruned heads' output weights are zero, the shapes are the "
           "original ones) or with headprune:" if zeroed else
           "Load it (its layers have different numbers of heads, which stock `from_pretrained` cannot build):")
    body += ["", "The exact heads are in `config.json` (`headprune.kept_heads`, original numbering).", "",
             "Made with:", "", "```", command, "```", "", how, "", "```python", "from headprune import load_pruned",
             f'model = load_pruned("{folder_name}")  # the path of this folder', "```", ""]
    return "\n".join(header + body)


def write_model_card(folder: Path, results: dict, command: str) -> None:
    with atomic_path(Path(folder) / "README.md") as tmp:
        tmp.write_text(model_card(results, command, Path(folder).name), encoding="utf-8")


def add_measured_speed(folder: Path, table: str, command: str) -> None:
    """Puts `headprune measure`'s table into the model card of `folder` (replacing an earlier one)."""
    path = Path(folder) / "README.md"
    card = path.read_text(encoding="utf-8") if path.is_file() else ""
    with atomic_path(path) as tmp:
        tmp.write_text(with_measured_speed(card, table, command), encoding="utf-8")
