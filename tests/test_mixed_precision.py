"""--mixed-precision: a bf16 run (Accelerate's autocast, on CPU too) prunes to k and saves a model that
reloads; and since Accelerate fixes the precision once per process, a second run in the same
process that asks for another is refused in one line, leaving no folder behind."""
import json
import os
import contextlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from conftest import write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.errors import ConfigError
from headprune.pruning import load_pruned
from headprune.recipes import prune
from headprune.selection import scoring_precision

ROOT = Path(__file__).parent.parent


def prune_in_a_process_of_its_own(model, data, out, precision, *options):
    """This process's Accelerate already runs without mixed precision: another process for another."""
    run = subprocess.run([sys.executable, "-m", "headprune.cli", "prune", "--task", "causal-lm", "--model", str(model),
                          "--dataset", str(data), "--max-length", "16", "--batch-size", "8", "--eval-batch-size", "8",
                          "--epochs", "1", "--k", "3", "--checkpoint-every", "0", "--mixed-precision", precision,
                          "--output-dir", str(out), *options],
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


def test_a_scored_method_scores_and_evaluates_in_bf16_too(tmp_path):
    """A scored method's model is not `prepare`d (nothing to train), so Accelerate does not wrap its
    forward: its scores, the means of mean ablation and the evaluations autocast all the same."""
    model, data = write_tiny_lm(tmp_path / "lm")
    options = ("--method", "activation", "--reconstruct", "bias")  # the bias: the means, reconstruction
    prune_in_a_process_of_its_own(model, data, tmp_path / "bf16", "bf16", *options)
    full = prune(lm_cfg(model, data, tmp_path / "fp32", method="activation", reconstruct="bias"))
    half = json.loads((tmp_path / "bf16" / "results.json").read_text())

    def scores(out):
        return [h["score"] for h in json.loads((out / "head_scores.json").read_text())]
    assert scores(tmp_path / "bf16") != pytest.approx(scores(tmp_path / "fp32"), rel=1e-6)
    assert scores(tmp_path / "bf16") == pytest.approx(scores(tmp_path / "fp32"), rel=0.05)  # bf16's rounding only
    for metrics in ("metrics_unpruned", "metrics_before_reconstruction", "metrics_pruned"):
        assert half[metrics]["validation"] != full[metrics]["validation"], metrics
        assert half[metrics]["validation"] == pytest.approx(full[metrics]["validation"], rel=0.05), metrics


def test_under_fp16_the_gradient_scorers_compute_in_float32():
    """No loss scaler in a scoring pass: fp16 gradients would underflow, so michel, fisher and taylor
    do not autocast to fp16; the forward-only scorers do, and every scorer does under bf16."""
    autocast = object()
    for precision, method, autocasts in [("fp16", "michel", False), ("fp16", "fisher", False), ("fp16", "taylor", False),
                                         ("fp16", "activation", True), ("fp16", "flap", True), ("bf16", "fisher", True)]:
        acc = SimpleNamespace(mixed_precision=precision, native_amp=True, autocast=lambda: autocast)
        context = scoring_precision(acc, method)
        assert (context is autocast) == autocasts and (autocasts or isinstance(context, contextlib.nullcontext)), method


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
