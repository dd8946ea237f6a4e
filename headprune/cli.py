"""The `headprune` command: `finetune`, `prune`, `sweep`, `measure`, `export` and `demo`.

Every option of finetune and prune comes from the config dataclasses (headprune/config.py), so the
flags, the YAML keys and the Python API are the same names. Options are parsed and checked before
torch, transformers or datasets are imported, so `--help` and input errors answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

from . import __version__, config as cfgmod
from .config import DEMO_DIR, MeasureConfig, SweepConfig
from .errors import HeadpruneError


class _Parser(argparse.ArgumentParser):
    """argparse's, but a bad option is one line and where to look (not the whole usage: prune's is
    sixty lines, the error under it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="headprune", description="Prune the attention heads of Transformer models.",
        epilog="Options can also come from a YAML file (--config); flags override it. "
               "Run `headprune COMMAND --help` for the options of a command.")
    top.add_argument("--version", action="version", version=f"headprune {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune (or train from scratch) a model for the task: the start "
                                         "of pipelined pruning",
                        description="Fine-tune a classifier, a translation model (or train one from scratch) or "
                                    "a language model for --task, and save it with its metric.")
    cfgmod.add_arguments(ft, cfgmod.FinetuneConfig)
    pr = sub.add_parser("prune", help="keep exactly k attention heads (DSP, STE, Voita, Michel, Fisher, "
                                      "activation, FLAP, Taylor or random; joint or pipelined)",
                        description="Choose which k heads to keep (learnt or scored), optionally "
                                    "reconstruct the blocks' outputs, and save the pruned model, the "
                                    "kept heads, the head scores and the metric before and after.")
    cfgmod.add_arguments(pr, cfgmod.PruneConfig)
    sw = sub.add_parser("sweep", help="compare methods x modes x budgets x seeds; table, plot, report",
                        description="Run every combination of --methods, --modes, --ks and --seeds as "
                                    "prune runs (finished ones are skipped), then write sweep.csv, "
                                    "sweep.md, summary.md, sweep.png and report.md. Other options are "
                                    "those of prune and apply to every run.")
    cfgmod.add_arguments(sw, SweepConfig)
    ms = sub.add_parser("measure", help="parameters, FLOPs, latency and throughput: pruned against original",
                        description="Compare a physically pruned model with its original: parameters, "
                                    "attention and total FLOPs, and latency and throughput measured side "
                                    "by side (alternating the two models) across batch sizes and lengths, "
                                    "with the speedup the FLOP ratio predicts.")
    cfgmod.add_arguments(ms, MeasureConfig)
    ex = sub.add_parser("export", help="a saved model for another runtime (onnx: ONNX Runtime; gguf: llama.cpp; "
                                       "transformers: a plain folder, the same heads in every layer)",
                        description="Write a model saved by headprune (pruned: uneven heads, empty layers) "
                                    "for ONNX Runtime, with dynamic batch and sequence axes, for llama.cpp, or, "
                                    "where every layer keeps as many heads, as a plain transformers folder; the "
                                    "result is run and compared with PyTorch before it is written.")
    cfgmod.add_arguments(ex, cfgmod.ExportConfig)
    dm = sub.add_parser("demo", help="the default job on the offline assets, then DSP-pruned",
                        description="classification (default): fine-tune MiniLM-L6 on 4,000 Rotten "
                                    "Tomatoes snippets (1 epoch), then prune it to --k (36 of 72) heads "
                                    "with pipelined DSP. translation: train a small Transformer from "
                                    "scratch on the Ding German-English pairs (needs apt-get install "
                                    "trans-de-en), then prune it to --k (18 of 36) heads. Finished "
                                    "phases found in --output-dir are reused.")
    dm.add_argument("--task", choices=["classification", "translation"], default="classification",
                    help="which demo (default: classification)")
    dm.add_argument("--k", type=int, default=None, help="heads to keep (default: half)")
    dm.add_argument("--output-dir", default=None,
                    help=f"folder for both phases (default: {DEMO_DIR}, or {DEMO_DIR}-translation)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .progress import quiet_library_bars
    quiet_library_bars()
    # headprune's own steps at INFO; other libraries' (ONNX's exporter logs hundreds of lines) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # one of several processes (torchrun, accelerate launch): the first speaks for all (results,
    # warnings, refusals: every process refuses the same input)
    speaks = os.environ.get("RANK", "0") == "0"
    logging.getLogger("headprune").setLevel(logging.INFO if speaks else logging.ERROR)
    if not speaks:
        sys.stdout = open(os.devnull, "w")
    try:
        return run(args)
    except HeadpruneError as err:
        if speaks:
            print(f"headprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("headprune: interrupted; the same command again resumes training and Michel's rounds from their "
              "last checkpoint, a pipelined run's reconstruction from its last block, a latency table and "
              "measure from their last setting, a scoring pass from its last record and a sweep at its "
              "unfinished run (taylor's pass and export start over)", file=sys.stderr)
        return 130


def _plain_text(record: logging.LogRecord) -> bool:
    """A record without terminal colour codes (transformers' load report colours its title even in a
    log file)."""
    if isinstance(record.msg, str) and "\x1b[" in record.msg:
        record.msg = re.sub(r"\x1b\[[0-9;]*m", "", record.msg)
    return True


def run(args: argparse.Namespace) -> int:
    """Check the options, then import what the command needs and run it."""
    configs = {"measure": MeasureConfig, "export": cfgmod.ExportConfig, "sweep": SweepConfig,
               "finetune": cfgmod.FinetuneConfig, "prune": cfgmod.PruneConfig}
    cfg = cfgmod.build_config(configs[args.command], args) if args.command in configs else None
    if args.command in ("finetune", "prune"):  # accepted (a sweep passes every option to every run), but said
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        ignored = [name for name in sorted(cfgmod.unused_settings(vars(cfg)))
                   if name in fields and getattr(cfg, name) != cfgmod.default_of(fields[name])]
        if ignored:
            logging.getLogger("headprune").warning(
                "%s: not read by this run (%s%s)", ", ".join("--" + n.replace("_", "-") for n in ignored),
                f"method {cfg.method}, " if args.command == "prune" else "", f"task {cfg.task}")
    import torch  # only now: a bad option is told without loading it
    from transformers.utils import logging as transformers_logging
    transformers_logging.get_logger("transformers")  # (its handler is made on first use)
    for handler in logging.getLogger().handlers + logging.getLogger("transformers").handlers:
        handler.addFilter(_plain_text)
    # Subnormal floats (activations near zero) are slow on CPUs: training the Ding translation model
    # ran at 15 steps a minute from its fourth epoch on, and at 95 with them flushed to zero.
    torch.set_flush_denormal(True)
    if args.command == "demo":
        from .recipes import demo
        root = Path(args.output_dir or (f"{DEMO_DIR}-translation" if args.task == "translation" else DEMO_DIR))
        results = demo(root, args.k, args.task)
        print_summary(results, root / f"dsp-pipelined-k{results['k']}")
        return 0
    if args.command == "measure":
        from .measuring import MEASURE_FILES, markdown, measure
        from .outputs import atomic_path, write_json
        result = measure(cfg, progress=logging.getLogger("headprune.measure").info)  # (with the time of day)
        table = markdown(result)
        if cfg.output_dir:
            write_json(Path(cfg.output_dir) / MEASURE_FILES[0], result)
            with atomic_path(Path(cfg.output_dir) / MEASURE_FILES[1]) as tmp:
                tmp.write_text(table)
        if cfg.card:
            from .card import add_measured_speed, command_of
            add_measured_speed(Path(cfg.pruned), table, command_of("measure", cfg))
        print(table)
        return 0
    if args.command == "export":
        if cfg.format == "gguf":
            from .llamacpp import export_gguf
            result = export_gguf(cfg)
            print(f"{result['output']}: llama.cpp `deci`, {sum(result['head_count'])} query and "
                  f"{sum(result['head_count_kv'])} key/value heads, {result['dtype']}")
            return 0
        if cfg.format == "transformers":
            from .plain import export_transformers
            result = export_transformers(cfg)
            print(f"{result['output']}: a plain transformers folder, {result['num_attention_heads']} query and "
                  f"{result['num_key_value_heads']} key/value heads a layer, largest difference "
                  f"{result['max_abs_difference']:.2g}")
            return 0
        from .export import export_onnx
        result = export_onnx(cfg)
        print(f"{result['output']}: ONNX Runtime against PyTorch, largest difference {result['max_abs_difference']:.2g}")
        return 0
    if args.command == "sweep":
        from .sweeping import sweep
        sweep(cfg)
        print(f"sweep results: {cfg.output_dir}/report.md")
        return 0
    if args.command == "finetune":
        from .recipes import finetune
        results = finetune(cfg)
    else:
        from .recipes import prune
        results = prune(cfg)
    print(json.dumps({k: results[k] for k in results if k.startswith("metrics")}, indent=2))
    return 0


def print_summary(results: dict, folder) -> None:
    print()
    metric = {"bleu": "BLEU"}.get(results["metric"], results["metric"])
    print(f"unpruned {metric} ({results['num_heads']} heads): {_rounded(results['metrics_unpruned'])}")
    print(f"pruned {metric} ({results['k']} heads, {results['method']} {results['mode']}): "
          f"{_rounded(results['metrics_pruned'])}")
    if len(results.get("kept_per_kind", {})) > 1:
        print(f"kept heads per kind: {results['kept_per_kind']}")
    print(f"results: {folder}/results.json and {folder}/report.md; heat map: {folder}/heads.png")
    print(f"pruned model: {folder}/model (load it with headprune.load_pruned)")


def _rounded(metrics: dict) -> dict:
    return {name: round(value, 4) for name, value in metrics.items()}


if __name__ == "__main__":
    sys.exit(main())
