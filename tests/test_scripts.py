"""Every script in benchmarks/ and every mode of scripts/reproduce_results.sh runs at the smallest
size, so that none can rot: the benchmarks on tiny finished runs (step_overhead on the real
MiniLM, a few steps), the reproduce script with every command checked by tests/dry_run.py (its
command lines parse, its configs load and validate, the scripts it calls import and accept their
arguments) instead of run for hours."""
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headprune.config import PruneConfig
from headprune.recipes import prune

ROOT = Path(__file__).parent.parent


def script(*args, cwd=ROOT):
    run = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def script_here(path, *args, monkeypatch, capsys) -> str:
    """Run a benchmark script as __main__ in this process (no second import of torch): its stdout."""
    monkeypatch.syspath_prepend(str(ROOT / Path(path).parent))  # its sibling imports
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, args)])
    capsys.readouterr()
    runpy.run_path(str(ROOT / path), run_name="__main__")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def finished_runs(tiny_finetuned, tmp_path_factory):
    """A pipelined DSP run and a Michel curve of the tiny classifier, evaluated on validation and test."""
    model, data = tiny_finetuned
    folder = tmp_path_factory.mktemp("runs")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for split, part in (("validation", rows[:20]), ("test", rows[20:40])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    common = dict(model=str(model), dataset=str(data), batch_size=16, checkpoint_every=0,
                  eval_files=[str(folder / "validation.jsonl"), str(folder / "test.jsonl")])
    prune(PruneConfig(**common, k=4, reconstruct="none", output_dir=str(folder / "dsp-pipelined-k4-s0")))
    prune(PruneConfig(**common, method="michel", k=2, michel_step=2, output_dir=str(folder / "michel-pipelined-s0")))
    return folder


def test_loss_and_accuracy(finished_runs, monkeypatch, capsys):
    out = script_here("benchmarks/loss_and_accuracy.py", finished_runs / "dsp-pipelined-k4-s0",
                      finished_runs / "michel-pipelined-s0", "--ks", 2, 6, monkeypatch=monkeypatch, capsys=capsys)
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]  # after the header
    assert [row.split(" | ")[1] for row in rows] == ["8", "4", "2", "6"]  # unpruned, DSP, Michel at k = 2, 6


@pytest.fixture(scope="module")
def biased_run(finished_runs):
    """A pipelined DSP run at its default for text classifiers: mean ablation and FLAP's bias."""
    results = json.loads((finished_runs / "dsp-pipelined-k4-s0" / "results.json").read_text())
    fields = {k: v for k, v in results["config"].items() if k in PruneConfig.__dataclass_fields__}
    run = finished_runs / "dsp-pipelined-k4-s0-bias"
    if not (run / "results.json").is_file():
        prune(PruneConfig(**{**fields, "reconstruct": "default", "ablation": "default", "output_dir": str(run)}))
    assert json.loads((run / "results.json").read_text())["reconstruct"] == "bias"
    return run


def test_loss_and_accuracy_of_a_run_with_a_bias_is_of_its_saved_model(biased_run, monkeypatch, capsys):
    out = script_here("benchmarks/loss_and_accuracy.py", biased_run, monkeypatch=monkeypatch, capsys=capsys)
    row = [line.split(" | ") for line in out.splitlines() if line.startswith("| dsp")][0]
    assert row[0] == "| dsp-pipelined-k4-s0-bias + bias" and row[1] == "4"
    test_accuracy = json.loads((biased_run / "results.json").read_text())["metrics_pruned"]["test"]
    assert float(row[7]) == pytest.approx(test_accuracy, abs=5e-5)  # the run's own accuracy, with its bias


def test_paired(finished_runs, biased_run, monkeypatch, capsys):
    def row(*args):
        out = script_here("benchmarks/paired.py", *args, "--resamples", 200, monkeypatch=monkeypatch, capsys=capsys)
        return [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1]
    dsp, michel = finished_runs / "dsp-pipelined-k4-s0", finished_runs / "michel-pipelined-s0"
    accuracy = {run: json.loads((run / "results.json").read_text())["metrics_pruned"]["test"] for run in (dsp, biased_run)}
    same = row("--a", dsp, "--b", dsp)
    assert float(same[2]) == float(same[3]) == pytest.approx(accuracy[dsp], abs=5e-5)  # the run's own accuracy
    assert same[4:7] == ["+0.00 points", "0.00", "+0.00 to +0.00"] and same[7].startswith("0 of 20")
    # two sides: DSP (and its default with the bias, measured on its saved model) against Michel's curve at 4 heads
    both = row("--a", dsp, biased_run, "--b", michel, "--k", 4)
    mean = (accuracy[dsp] + accuracy[biased_run]) / 2
    assert float(both[2]) == pytest.approx(mean, abs=5e-5)
    assert float(both[4].split()[0]) == pytest.approx(100 * (mean - float(both[3])), abs=0.006)
    with pytest.raises(SystemExit, match="has no curve through k=3"):
        row("--a", dsp, "--b", michel, "--k", 3)
    seeds = row("--a", dsp, biased_run, "--b", michel, "--k", 4, "--resample-runs")  # the same difference
    assert seeds[2:5] == both[2:5]


def test_paired_reads_a_michel_curve_with_a_bias_at_its_last_k_on_its_saved_model(finished_runs, monkeypatch,
                                                                                    capsys):
    """The curve's saved model (its last k) holds the bias; its other k are its heads without one."""
    results = json.loads((finished_runs / "michel-pipelined-s0" / "results.json").read_text())
    fields = {k: v for k, v in results["config"].items() if k in PruneConfig.__dataclass_fields__}
    run = finished_runs / "michel-pipelined-s0-bias"
    prune(PruneConfig(**{**fields, "reconstruct": "bias", "output_dir": str(run)}))
    results = json.loads((run / "results.json").read_text())
    curve = {e["heads"]: e["metrics"]["test"] for e in results["curve"]}

    def accuracy(k):
        out = script_here("benchmarks/paired.py", "--a", run, "--b", run, "--k", k, "--resamples", 10,
                          monkeypatch=monkeypatch, capsys=capsys)
        return float([line.split(" | ") for line in out.splitlines() if line.startswith("| ")][1][2])
    assert results["k"] == 2 and results["metrics_pruned"]["test"] != curve[2]  # the bias changed what it classifies
    assert accuracy(2) == pytest.approx(results["metrics_pruned"]["test"], abs=5e-5)
    assert accuracy(4) == pytest.approx(curve[4], abs=5e-5)


def test_paired_on_training_examples_nothing_learned_from(tiny_assets, finished_runs, tmp_path, monkeypatch, capsys):
    """--split unseen-train: the training examples after the first N, where the fine-tuning and the
    runs used at most N (checked); pooled with the test split, its examples follow the test's."""
    from headprune.config import FinetuneConfig
    from headprune.recipes import finetune
    model, data = tiny_assets
    finetune(FinetuneConfig(model=str(model), dataset=str(data), epochs=1, batch_size=16, max_train_examples=100,
                            output_dir=str(tmp_path / "ft"), checkpoint_every=0))
    evals = [str(finished_runs / f"{split}.jsonl") for split in ("validation", "test")]
    run = tmp_path / "dsp-pipelined-k4-s0"
    prune(PruneConfig(model=str(tmp_path / "ft" / "model"), dataset=str(data), eval_files=evals, k=4, batch_size=16,
                      checkpoint_every=0, reconstruct="none", max_train_examples=100, output_dir=str(run)))
    rows = len(data.read_text().splitlines())

    def table(*args):
        out = script_here("benchmarks/paired.py", "--a", run, "--b", run, "--resamples", 50, *args,
                          monkeypatch=monkeypatch, capsys=capsys)
        return [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1]
    unseen, test = table("--split", "unseen-train", "--unseen-from", 100), table()
    pooled = table("--split", "test", "unseen-train", "--unseen-from", 100)
    assert unseen[7] == f"0 of {rows - 100} |" and pooled[7] == f"0 of {rows - 100 + 20} |"
    assert float(pooled[2]) == pytest.approx((20 * float(test[2]) + (rows - 100) * float(unseen[2])) / (rows - 80),
                                             abs=1e-4)
    with pytest.raises(SystemExit, match="used 100 training examples, not at most the first 90"):
        table("--split", "unseen-train", "--unseen-from", 90)
    with pytest.raises(SystemExit, match=r"dsp-pipelined-k4-s0: its scores used \d+ training examples, not at most the "
                       "first 100"):  # a run on the model fine-tuned on every row
        script_here("benchmarks/paired.py", "--a", finished_runs / "dsp-pipelined-k4-s0", "--b", run, "--split",
                    "unseen-train", "--unseen-from", 100, monkeypatch=monkeypatch, capsys=capsys)
    tuned = tmp_path / "ft" / "results.json"  # a model fine-tuned on other data: its unseen rows are not these
    tuned.write_text(json.dumps({**json.loads(tuned.read_text()), "dataset": "offline:subjectivity"}))
    with pytest.raises(SystemExit, match="its model was fine-tuned on offline:subjectivity, not on "):
        table("--split", "unseen-train", "--unseen-from", 100)


def test_a_paired_difference_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from paired import paired_difference
    import torch
    # differences 0, 1, -1, 0, 1: mean 0.2, sample standard deviation sqrt(2.8 / 4), over sqrt(5)
    r = paired_difference(torch.tensor([1, 1, 0, 0, 1.], dtype=torch.float64),
                          torch.tensor([1, 0, 1, 0, 0.], dtype=torch.float64), resamples=2000)
    assert (r["a"], r["b"], r["differ"], r["examples"]) == (0.6, 0.4, 3, 5)
    assert r["difference"] == pytest.approx(0.2) and r["standard_error"] == pytest.approx((2.8 / 4) ** 0.5 / 5 ** 0.5)
    assert -1 <= r["low"] < 0.2 < r["high"] <= 1  # resampled means of five differences in -1..1
    # two runs of a side that agree: resampling the runs too changes nothing (the examples drawn are the same)
    twice = torch.tensor([[1, 1, 0, 0, 1.]] * 2, dtype=torch.float64)
    again = paired_difference(twice, torch.tensor([1, 0, 1, 0, 0.], dtype=torch.float64), resamples=2000,
                              resample_runs=True)
    assert (again["low"], again["high"], again["difference"]) == (r["low"], r["high"], r["difference"])
    # two runs that disagree on everything against a constant 0.5: every example's difference is 0, so
    # over the examples alone the interval is 0 to 0; drawing the runs too, both of the all-wrong run
    # (a quarter of the resamples) give -0.5 and both of the all-right one +0.5
    runs = torch.tensor([[1, 1, 1, 1.], [0, 0, 0, 0.]], dtype=torch.float64)
    half = torch.full((4,), 0.5, dtype=torch.float64)
    plain = paired_difference(runs, half, resamples=2000)
    assert (plain["low"], plain["high"]) == (0.0, 0.0)
    spread = paired_difference(runs, half, resamples=2000, resample_runs=True)
    assert (spread["low"], spread["high"], spread["difference"]) == (-0.5, 0.5, 0.0)


def test_reconstruction_on_a_finished_run(finished_runs, tmp_path, monkeypatch, capsys):
    import shutil
    run = tmp_path / "dsp-pipelined-k4-s0"  # as recorded by a headprune without --pruning-lr-schedule
    shutil.copytree(finished_runs / "dsp-pipelined-k4-s0", run)
    recorded = json.loads((run / "results.json").read_text())
    recorded["config"]["pruning_lr_schedule"] = None
    recorded["config"].update(reconstruct="none", ablation="zero")  # a run that read no calibration data itself
    (run / "results.json").write_text(json.dumps(recorded))
    out = script_here("benchmarks/reconstruction.py", run, "--modes", "bias", "both", "bias", "--calibration-examples",
                      10000, monkeypatch=monkeypatch, capsys=capsys)
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| dsp")]
    assert [r[2] for r in rows] == ["none (the run's heads)", "bias", "both", "bias"]
    assert rows[1][3] == rows[3][3]  # the weights were put back between modes
    # the same as a run that chose these heads and reconstructed itself
    results = json.loads((run / "results.json").read_text())
    fields = {k: v for k, v in results["config"].items() if k in PruneConfig.__dataclass_fields__}
    fields["pruning_lr_schedule"] = "linear"
    again = prune(PruneConfig(**{**fields, "reconstruct": "bias", "ablation": "zero", "output_dir": str(tmp_path / "again")}))
    assert [list(h) for h in again["kept_heads"]] == results["kept_heads"]
    assert json.loads(rows[1][3]) == again["metrics_pruned"]


def test_prune_in_trainer_on_the_real_minilm(tmp_path):
    out = script("scripts/prune_in_trainer.py", "--k", 12, "--max-steps", 3, "--train-examples", 48,
                 "--eval-examples", 32, "--gradient-accumulation-steps", 2, "--output-dir", tmp_path)
    assert "kept 12 heads" in out and "validation accuracy of the pruned model" in out
    from headprune.pruning import load_pruned
    assert len(load_pruned(tmp_path / "pruned").config.headprune["kept_heads"]) == 12
    before = (tmp_path / "pruned" / "model.safetensors").read_bytes()
    for flags, message in ((["--output-dir", tmp_path], f"{tmp_path / 'pruned'} holds files already; pass "
                                                        "overwrite=True"),
                           (["--k", 0, "--output-dir", tmp_path / "other"], "k=0")):
        run = subprocess.run([sys.executable, "scripts/prune_in_trainer.py", *map(str, flags)], capture_output=True,
                             text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("prune_in_trainer.py: error: ")
        assert message in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "pruned" / "model.safetensors").read_bytes() == before


def test_check_architectures_tells_supported_refused_and_wrong(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import check_architectures
    assert check_architectures.main(["bert", "olmo2", "no-such-type"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows[0] == "| bert | supported | 2 attention blocks, 8 heads; pruned = masked (max 0) |"
    assert rows[1].startswith("| olmo2 | refused | headprune does not support 'olmo2': its attention's q_norm")
    assert rows[2].startswith("| no-such-type | not built here | ValueError")
    # every model type of its list (38 exact, 15 refused, with transformers 5.25): none matches a layout wrongly
    assert check_architectures.main(["--all-known"]) == 0
    capsys.readouterr()
    real_removal = check_architectures.remove_heads

    def off_by_a_little(model, kept):  # a removal that gets one weight wrong
        model = real_removal(model, kept)
        with torch.no_grad():
            model.bert.encoder.layer[0].attention.output.dense.weight[0, 0] += 0.5
        return model
    monkeypatch.setattr(check_architectures, "remove_heads", off_by_a_little)
    assert check_architectures.main(["bert"]) == 1
    assert capsys.readouterr().out.splitlines()[2].startswith("| bert | mismatch | outputs differ by")


def test_recovery_finetune(finished_runs, tmp_path, monkeypatch, capsys):
    out = script_here("benchmarks/recovery_finetune.py", finished_runs / "dsp-pipelined-k4-s0", "--ks", 2,
                      "--output-dir", tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    row = out.splitlines()[-1].split(" | ")
    assert row[1] == "4" and all(0 <= float(cell) <= 1 for cell in row[2:5])
    assert (tmp_path / "dsp-pipelined-k4-s0-k4" / "recovered" / "results.json").is_file()


def test_recovery_finetune_starts_from_the_saved_model_of_a_run_with_a_bias(biased_run, tmp_path, monkeypatch, capsys):
    script_here("benchmarks/recovery_finetune.py", biased_run, "--output-dir", tmp_path,
                monkeypatch=monkeypatch, capsys=capsys)
    row = tmp_path / "dsp-pipelined-k4-s0-bias-k4"
    recovered = json.loads((row / "recovered" / "results.json").read_text())
    assert recovered["config"]["model"] == str(biased_run / "model") and not (row / "pruned").exists()


def test_schedule_trace(finished_runs, tiny_finetuned, tmp_path, monkeypatch, capsys):
    model, data = tiny_finetuned
    config = tmp_path / "prune.yaml"
    config.write_text(f"dataset: {data}\nbatch_size: 16\ncheckpoint_every: 0\n"
                      f"eval_files: [{finished_runs / 'validation.jsonl'}, {finished_runs / 'test.jsonl'}]\n")
    args = ["benchmarks/schedule_trace.py", "--config", config, "--model", model, "--k", 4, "--points", 3,
            "--output-dir", tmp_path / "run", "--set", "t0=5.0"]
    out = script_here(*args, monkeypatch=monkeypatch, capsys=capsys)
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    steps = len(json.loads((tmp_path / "run" / "trace.json").read_text()))  # the scores before every step
    assert [int(row[0][2:]) for row in rows] == [round(steps / 3), round(2 * steps / 3), steps]
    assert all(sum(map(int, row[2].split())) == 4 for row in rows)  # 4 heads kept, counted per layer
    assert rows[-1][3] == "0"  # the last row is the run's own choice
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["reconstruct"] == "default" and "output_biases_added" in results  # chosen for the bias
    # ... and measured on the model the run saved, the closed heads' means included
    assert rows[-1][4].rstrip(" |") == f"{results['metrics_pruned']['validation']:.4f}"
    assert float(rows[0][1]) < 5  # the temperature falls from t0 = 5
    assert script_here(*args, monkeypatch=monkeypatch, capsys=capsys) == out  # read back, not run again
    (tmp_path / "run" / "trace.json").unlink()  # a run without its trace: one line, the run kept
    with pytest.raises(SystemExit, match="holds a run without its trace"):
        script_here(*args, monkeypatch=monkeypatch, capsys=capsys)
    assert (tmp_path / "run" / "results.json").is_file()
    with pytest.raises(SystemExit, match="the means of another --calibration-dataset are not rebuilt here"):
        script_here(*args[:-1], "t0=5.0", "calibration_dataset=other", monkeypatch=monkeypatch, capsys=capsys)


def test_planted_heads(monkeypatch, capsys):
    out = script_here("benchmarks/planted_heads.py", "--steps", 3, "--ks", 6, 66, "--seeds", 0, "--settings",
                      "dsp --schedule steady", "dsp, k rounds", "ste", "voita", monkeypatch=monkeypatch, capsys=capsys)
    assert out.count("| dsp --schedule steady |") == 2 and "| dsp, k rounds | 66 |" in out
    import benchmarks.planted_heads as planted  # --grid: 72 settings of the same runs; one checked here
    monkeypatch.setattr(planted.itertools, "product", lambda *lists: [tuple(values[0] for values in lists)])
    planted.grid([6], [2], [0])
    assert capsys.readouterr().out.count("\n| 1 | 0.1 | 1 | 6 | ") == 1


def test_step_overhead_on_the_real_minilm():
    out = script("benchmarks/step_overhead.py", "--rounds", 2, "--warmup", 0, "--batch-size", 2, "--max-length", 16)
    assert "joint DSP / plain step:" in out


@pytest.mark.parametrize("method", ["dsp", "fisher", "taylor"])
def test_activation_memory_on_the_real_minilm(method):
    out = script("benchmarks/activation_memory.py", "--method", method, "--batch-size", 2, "--length", 16,
                 "--steps", 2, "--repeats", 1)
    assert f"offline:minilm-l6, {method}" in out and "| off |" in out and "| on |" in out
    assert re.search(r"with / without: memory \d+\.\d\dx, time \d+\.\d\dx", out)


@pytest.mark.parametrize("mode", ["dsp", "sweep", "speed", "translation", "llm", "today", "vision", "budgets"])
def test_every_mode_of_the_reproduce_script(mode, tmp_path):
    import dry_run
    log, stub = tmp_path / "calls", tmp_path / "stub"
    stub.write_text(dry_run.STUB)
    run = subprocess.run(["bash", "scripts/reproduce_results.sh", mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "DRY_RUN_LOG": str(log), "HEADPRUNE": f"bash {stub} headprune",
                                           "PYTHON": f"bash {stub} script", "OUT": str(tmp_path / "results")})
    assert run.returncode == 0, run.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert calls and all(call.startswith(("headprune ", "script ")) for call in calls)
    for call in calls:
        dry_run.check(call)
    if mode == "sweep":
        assert sum(call.startswith("script benchmarks/") for call in calls) == 6


def test_the_reproduce_script_refuses_an_unknown_mode():
    run = subprocess.run(["bash", "scripts/reproduce_results.sh", "everything"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "usage:" in run.stderr


def test_speed_targets_with_both_allocations_timed_side_by_side(tiny_finetuned, tmp_path, monkeypatch, capsys):
    import headprune.measuring as measure
    from headprune.sites import find_sites
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "alternate", lambda models, run, *a: {  # no clock: 8 ms plus 1 ms a kept head
        name: {"median": 0.008 + 0.001 * sum(s.num_heads for s in find_sites(m))} for name, m in models.items()})
    model, data = tiny_finetuned
    out = script_here("benchmarks/speed_targets.py", "--model", model, "--dataset", data, "--methods", "fisher",
                      "--batch-size", 16, "--max-length", 16, "--at-batch-size", 2, "--targets", 1.2, 1.5, 3,
                      "--output-dir", tmp_path / "speed", monkeypatch=monkeypatch, capsys=capsys)
    rows = {tuple(line.split(" | ")[1:4]): line.split(" | ") for line in out.splitlines() if line.startswith("| fisher")}
    # whole 16 ms; 1.2x: 5 of the 8 heads (13 ms), 1.5x: 2 (10 ms); uniform spreads them 3 + 2 and 1 + 1
    assert set(rows) == {("1.2x", "global", "5"), ("1.2x", "uniform", "5"), ("1.5x", "global", "2"),
                         ("1.5x", "uniform", "2")}
    assert rows[("1.2x", "global", "5")][6] == f"{16 / 13:.3f}x" and rows[("1.5x", "uniform", "2")][6] == "1.600x"
    saved = json.loads((tmp_path / "speed" / "speed_targets.json").read_text())
    uniform = next(r for r in saved["rows"] if r["allocation"] == "uniform" and r["budget_value"] == 1.5)
    kept = json.loads((Path(uniform["folder"]) / "results.json").read_text())["kept_heads"]
    assert sorted(layer for _, layer, _ in kept) == [0, 1]
    assert "heldout" in saved["rows"][0] and len(saved["unreachable"]) == 2  # 3x: 8 ms are not the heads'
    assert "--target-speedup 3: even one head predicts 1.78x" in saved["unreachable"][0]
    assert not (tmp_path / "speed" / "global" / "fisher-pipelined-speedup3-s0").exists()  # no empty folder left


def test_targets_compare_dsp_with_each_methods_best_setting(tmp_path, monkeypatch, capsys):
    def sweep_csv(folder, rows):
        folder.mkdir()
        lines = ["method,mode,k,seed,validation,test,passes,seconds,run"]
        lines += [f"{m},pipelined,{k},{s},{v},{t},1,1,x" for m, k, s, v, t in rows]
        (folder / "sweep.csv").write_text("\n".join(lines) + "\n")
    sweep_csv(tmp_path / "dsp", [("dsp", 12, 0, 0.70, 0.74), ("dsp", 12, 1, 0.72, 0.76),
                                 ("dsp", 36, 0, 0.77, 0.771), ("dsp (mean ablation) + bias", 12, 0, 0.9, 0.9)])
    # flap: with the bias better on validation (so chosen) though worse on test; taylor best at 36
    sweep_csv(tmp_path / "scored", [("flap", 12, 0, 0.60, 0.70), ("flap + bias", 12, 0, 0.65, 0.66),
                                    ("taylor", 12, 0, 0.55, 0.73), ("flap", 36, 0, 0.70, 0.70),
                                    ("taylor", 36, 0, 0.76, 0.775)])
    out = script_here("benchmarks/targets.py", tmp_path / "dsp", tmp_path / "scored", "--ks", 12, 24, 36,
                      monkeypatch=monkeypatch, capsys=capsys)
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # k = 12: DSP 0.75 (mean of 2 seeds); flap's chosen variant "flap + bias" (0.66); taylor 0.73 best
    assert rows[0] == "| 12 | 0.7500 | 0.7300 (taylor) | 1 point above: +2.0 points | yes |"
    assert rows[1] == "| 24 | not run | | | |"
    assert rows[2] == "| 36 | 0.7710 | 0.7750 (taylor) | level (at most 0.5 point below): -0.4 points | yes |"


def test_llamacpp_exports_both_models_and_runs_them_where_llama_cpp_is_installed(tmp_path, monkeypatch, capsys):
    from conftest import write_tiny_lm, write_tokenizer_gguf
    from headprune.pruning import load_pruned, save_pruned
    pytest.importorskip("gguf")
    base, _ = write_tiny_lm(tmp_path, layers=2, heads=6, kv_heads=3)
    save_pruned(load_pruned(base), tmp_path / "pruned", [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 1, 2)])
    tokenizer = write_tokenizer_gguf(tmp_path / "tokenizer.gguf", vocab=44)
    args = ["benchmarks/llamacpp.py", tmp_path / "pruned", "--base", base, "--tokenizer-gguf", tokenizer,
            "--output-dir", tmp_path / "out", "--prompts", 2, "--new-tokens", 4, "--repeats", 1]
    try:
        import llama_cpp  # noqa: F401  (not in CI: it compiles llama.cpp)
    except ImportError:
        with pytest.raises(SystemExit, match="llama-cpp-python is not installed"):
            script_here(*args, monkeypatch=monkeypatch, capsys=capsys)
        out = capsys.readouterr().out
    else:
        out = script_here(*args, monkeypatch=monkeypatch, capsys=capsys)
        result = json.loads((tmp_path / "out" / "llamacpp.json").read_text())
        assert result["same_tokens"] == 2 and result["pruned"]["head_count_kv"] == [1, 2]
        # 3 key/value heads of 8 values, keys and values, f16, 256 positions: 0.0234 MiB, logged as 0.02
        assert result["pruned"]["kv_cache_mib_predicted"] == pytest.approx(3 * 8 * 2 * 2 * 256 / 2**20)
        assert result["pruned"]["kv_cache_mib"] == pytest.approx(result["pruned"]["kv_cache_mib_predicted"], abs=0.005)
    assert "pruned: " in out and "(6 query, 3 key/value heads)" in out  # 1 + 2 groups of 2 queries
    assert "unpruned: " in out and "(12 query, 6 key/value heads)" in out


def test_llamacpp_reads_llama_cpp_logs_and_compares_tokens():
    from benchmarks.llamacpp import first_difference, kv_cache_mib
    log = ("llama_kv_cache:        CPU KV buffer size =     1.50 MiB\nllama_kv_cache: size = 1.50 MiB\n"
           "llama_kv_cache:        CPU KV buffer size =     0.25 MiB\n")
    assert kv_cache_mib(log) == 1.75 and kv_cache_mib("no cache here") is None
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 5, 3], [1, 2, 3]) == 1 and first_difference([1, 2], [1, 2, 3]) == 2
