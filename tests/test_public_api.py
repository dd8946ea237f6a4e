"""The names `headprune` exports are the functions and classes the docs name, whatever was imported
before: a submodule of the same name would replace its function on the package once imported."""
import subprocess
import sys

import headprune

PAIRS = '''
import headprune
from headprune.recipes import prune                       # imports reconstruction, measuring, ... on its way
from headprune.sweeping import planned_runs               # the sweep's own module
import headprune.measuring, headprune.reconstruction, headprune.export
from headprune import *
import inspect
print(sorted(name for name in headprune.__all__ if inspect.ismodule(getattr(headprune, name))))
print(sorted(name for name in headprune.__all__ if not callable(getattr(headprune, name))))
'''


def test_no_exported_name_is_a_module_whatever_was_imported_before():
    run = subprocess.run([sys.executable, "-c", PAIRS], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["[]", "[]"]


def test_each_config_goes_with_the_function_that_takes_it():
    from headprune.config import ExportConfig, FinetuneConfig, MeasureConfig, PruneConfig, SweepConfig
    exported = {name: getattr(headprune, name) for name in headprune.__all__}
    assert exported["PruneConfig"] is PruneConfig and exported["FinetuneConfig"] is FinetuneConfig
    assert exported["SweepConfig"] is SweepConfig and exported["MeasureConfig"] is MeasureConfig
    assert exported["ExportConfig"] is ExportConfig
    for function in ("prune", "finetune", "sweep", "measure", "export_onnx"):
        assert callable(exported[function]), function
    assert headprune.__all__ == sorted(headprune.__all__) and set(dir(headprune)) >= set(headprune.__all__)
