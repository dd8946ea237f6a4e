"""Checks of a command instead of running it, for the smoke test of scripts/reproduce_results.sh
(tests/test_scripts.py): every command line parses and builds its config (types, ranges, YAML
files); every benchmark script imports and accepts its arguments. The test runs the script with
`headprune` and `python` standing in as a stub that only writes each call to a log, then checks
every logged call here, in its own process (torch imported once, not once per call).

    check("headprune prune --config configs/rotten-tomatoes.yaml --k 12 ...")
    check("script benchmarks/loss_and_accuracy.py RUN ... --ks 6 12")
"""
import argparse
import runpy
import shlex
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
    saved_path, saved_argv, real = list(sys.path), list(sys.argv), argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed
    try:
        sys.path.insert(0, str(Path(path).parent))
        module = runpy.run_path(path, run_name="dry_run")
        argparse.ArgumentParser.parse_args = parse_then_stop
        sys.argv = [path, *argv]
        try:
            module["main"]()
        except Parsed:
            return
        raise SystemExit(f"{path}: main() never parsed its arguments")
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv
        argparse.ArgumentParser.parse_args = real


def check(call: str) -> None:
    """One logged call ("headprune ..." or "script PATH ..."); any error names the call in one line."""
    kind, *rest = shlex.split(call)
    try:
        check_headprune(rest) if kind == "headprune" else check_script(rest[0], rest[1:])
    except (Exception, SystemExit) as err:
        raise AssertionError(f"dry run: {call}: {type(err).__name__}: {err}") from None


# The stand-in for `headprune` and `python` in the reproduce script: logs the call, runs nothing.
STUB = """#!/usr/bin/env bash
{ printf '%s' "$1"; shift; printf ' %q' "$@"; printf '\\n'; } >> "$DRY_RUN_LOG"
"""

