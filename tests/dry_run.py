"""Stand-ins for `headprune` and `python` that check a command instead of running it, for the
smoke test of scripts/reproduce_results.sh (tests/test_scripts.py): every command line parses and
builds its config (types, ranges, YAML files); every benchmark script imports and accepts its
arguments. Each call is appended to $DRY_RUN_LOG.

    python tests/dry_run.py headprune prune --config configs/rotten-tomatoes.yaml --k 12 ...
    python tests/dry_run.py script benchmarks/loss_and_accuracy.py RUN ... --ks 6 12
"""
import argparse
import os
import runpy
import sys
from pathlib import Path


class Parsed(Exception):
    pass


def check_headprune(argv: list[str]) -> None:
    from headprune import config as cfgmod
    from headprune.cli import parser

    args = parser().parse_args(argv)
    classes = {"finetune": cfgmod.FinetuneConfig, "prune": cfgmod.PruneConfig, "sweep": cfgmod.SweepConfig,
               "measure": cfgmod.MeasureConfig}
    if args.command in classes:
        cfgmod.build_config(classes[args.command], args)


def check_script(path: str, argv: list[str]) -> None:
    """Import the script (its imports must resolve), then run its main() until its arguments are parsed."""
    sys.path.insert(0, str(Path(path).parent))
    module = runpy.run_path(path, run_name="dry_run")
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed
    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [path, *argv]
    try:
        module["main"]()
    except Parsed:
        return
    raise SystemExit(f"{path}: main() never parsed its arguments")


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    with open(os.environ["DRY_RUN_LOG"], "a") as log:
        log.write(" ".join([kind, *rest]) + "\n")
    try:
        check_headprune(rest) if kind == "headprune" else check_script(rest[0], rest[1:])
    except Exception as err:  # one line, like headprune's own errors
        sys.exit(f"dry run: {' '.join(rest)}: {type(err).__name__}: {err}")
