"""--mixed-precision: a bf16 run (Accelerate's autocast, on CPU too) prunes to k and saves a model that
reloads; and since Accelerate fixes the precision once per process, a second run in the same
process that asks for another is refused in one line, leaving no folder behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.errors import ConfigError
from headprune.pruning import load_pruned
from headprune.recipes import prune

ROOT = Path(__file__).parent.parent


def prune_in_a_process_of_its_own(model, data, out, precision):
    """This process's Accelerate already runs without mixed precision: another process for another."""
    run = subprocess.run([sys.executable, "-m", "headprune.cli", "prune", "--task", "causal-lm", "--model", str(model),
                          "--dataset", str(data), "--max-length", "16", "--batch-size", "8", "--eval-batch-size", "8",
                          "--epochs", "1", "--k", "3", "--checkpoint-every", "0", "--mixed-precision", precision,
                          "--output-dir", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_a_bf16_run_prunes_to_k_and_its_model_reloads(tmp_path):
    model, data = write_tiny_lm(tmp_path / "lm")
    out = tmp_path / "bf16"
    run = prune_in_a_process_of_its_own(model, data, out, "bf16")
    assert "does nothing on cpu" not in run.stderr  # bf16 autocasts on a CPU
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["mixed_precision"] == "bf16" and len(results["kept_heads"]) == 3
    assert 1 < results["metrics_pruned"]["validation"] < 1000
    loaded = load_pruned(out / "model")
    assert sum(layer.self_attn.k_proj.out_features for layer in loaded.model.layers) == 3 * loaded.config.head_dim
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[3, 4, 5, 6]])).logits).all()


def test_another_precision_in_the_same_process_is_one_line_and_leaves_nothing(tmp_path):
    model, data = write_tiny_lm(tmp_path / "lm")
    Accelerator()  # this process's Accelerate: no mixed precision (the tests' other runs use none)
    with pytest.raises(ConfigError, match="already runs Accelerate with 'no', which is set once per process"):
        prune(lm_cfg(model, data, tmp_path / "bf16", mixed_precision="bf16"))
    assert not (tmp_path / "bf16").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocasts on a GPU: nothing to warn of")
def test_fp16_on_a_cpu_says_it_computes_in_float32(tmp_path):
    model, data = write_tiny_lm(tmp_path / "lm")
    run = prune_in_a_process_of_its_own(model, data, tmp_path / "fp16", "fp16")
    assert "--mixed-precision fp16 does nothing on cpu" in run.stderr and "bf16 does autocast on CPU" in run.stderr
