"""A killed run resumes to the same result; bad input is refused before any training."""
import json
import os
import subprocess
import sys

import pytest

import headprune.recipes as recipes
from headprune.config import PruneConfig
from headprune.data import DataError
from headprune.outputs import OutputExistsError
from headprune.errors import ModelError
from headprune.recipes import prune
from headprune.sites import UnsupportedArchitectureError
from headprune.train import CheckpointError


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "headprune.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def prune_args(model, data, out, *extra):
    return ["prune", "--model", model, "--dataset", data, "--k", 3, "--epochs", 2, "--batch-size", 16,
            "--t0", 1.0, "--tf", 1e-4, "--checkpoint-every", 4, "--output-dir", out, *extra]


@pytest.mark.parametrize("mode", ["pipelined", "joint"])
def test_a_killed_run_resumes_to_the_same_heads(tiny_finetuned, tmp_path, mode):
    model, data = tiny_finetuned
    whole = cli(*prune_args(model, data, tmp_path / "whole", "--mode", mode))
    assert whole.returncode == 0, whole.stderr

    args = prune_args(model, data, tmp_path / "killed", "--mode", mode)
    killed = cli(*args, env={"HEADPRUNE_KILL_AT_STEP": "10"})  # 18 steps; checkpoint at 8
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "results.json").exists()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["__items__"][0] == ["step", 8]
    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "at step 8 of 18" in resumed.stderr

    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert b["kept_heads"] == a["kept_heads"]
    assert b["metrics_pruned"] == a["metrics_pruned"] and b["resumed_from_step"] == 8
    la = json.loads((tmp_path / "whole" / "head_scores.json").read_text())
    lb = json.loads((tmp_path / "killed" / "head_scores.json").read_text())
    assert [r["logit"] for r in lb] == pytest.approx([r["logit"] for r in la], abs=1e-9)


def test_a_resumed_run_logs_the_same_losses(tiny_finetuned, tmp_path):
    """A log row averages the steps since the last one, those before the checkpoint included: 72
    steps, a row every 2, a checkpoint every 5 (the row at step 6 averages steps 5 and 6)."""
    model, data = tiny_finetuned

    def args(out):
        return ["prune", "--model", model, "--dataset", data, "--k", 3, "--batch-size", 2, "--max-train-examples", 144,
                "--checkpoint-every", 5, "--output-dir", out]
    assert cli(*args(tmp_path / "whole")).returncode == 0
    assert cli(*args(tmp_path / "killed"), env={"HEADPRUNE_KILL_AT_STEP": "7"}).returncode == -9
    assert cli(*args(tmp_path / "killed")).returncode == 0

    def losses(out):
        return [(row["step"], row["loss"]) for row in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())]
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert [step for step, _ in resumed] == [step for step, _ in whole] and whole[2][0] == 6
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], rel=1e-6)


def test_a_killed_michel_curve_resumes_without_scoring_its_rounds_again(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned

    def args(out):  # 8 heads to 3, one a round: six masks scored and evaluated
        return ["prune", "--method", "michel", "--model", model, "--dataset", data, "--k", 3, "--michel-step", 1,
                "--batch-size", 16, "--checkpoint-every", 1, "--output-dir", out]
    whole = cli(*args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = cli(*args(tmp_path / "killed"), env={"HEADPRUNE_KILL_AT_STEP": "4"})  # after the fourth mask's part
    assert killed.returncode == -9 and not (tmp_path / "killed" / "results.json").exists()
    state = dict(json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["__items__"])
    assert state["step"] == 4
    seconds_before = dict(state["seconds"]["__items__"])  # the rounds' time so far, not only loading's
    assert seconds_before["prune"] > 0
    resumed = cli(*args(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "michel: resuming with 4 masks scored or evaluated before" in resumed.stderr
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert b["kept_heads"] == a["kept_heads"] and b["curve"] == a["curve"] and len(a["curve"]) == 6
    assert b["metrics_pruned"] == a["metrics_pruned"] and b["resumed_from_step"] == 4
    assert b["seconds"]["prune"] >= seconds_before["prune"]
    assert not (tmp_path / "killed" / "checkpoint").exists()


def test_resuming_with_other_settings_is_refused(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    cli(*prune_args(model, data, tmp_path), env={"HEADPRUNE_KILL_AT_STEP": "5"})
    other = cli(*prune_args(model, data, tmp_path), "--seed", 3)
    assert other.returncode == 2
    assert "made with other settings (seed: 0 -> 3)" in other.stderr
    assert "pass --overwrite to discard it and start over" in other.stderr
    again = cli(*prune_args(model, data, tmp_path), "--seed", 3, "--overwrite")  # as the message says
    assert again.returncode == 0, again.stderr
    assert "discarding the checkpoint" in again.stderr and "resuming dsp" not in again.stderr
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == 3


def test_a_corrupt_checkpoint_gives_a_clear_error(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text('{"__items__": [["step", 3]]}')
    (tmp_path / "checkpoint" / "tensors.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable.*delete it to start over"):
        prune(PruneConfig(model=str(model), dataset=str(data), output_dir=str(tmp_path), k=3))


# -- input errors, all before training -------------------------------------------------------------

@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(recipes, "train", fail)


def cfg(model, data, out, **kw):
    return PruneConfig(**{"model": str(model), "dataset": str(data), "output_dir": str(out), "k": 3, **kw})


@pytest.mark.parametrize("k,message", [(0, "k=0: at least one head"), (9, "k=9 is more than the 8 heads")])
def test_budget_outside_1_to_n(tiny_finetuned, tmp_path, no_training, k, message):
    with pytest.raises(ValueError, match=message):
        prune(cfg(*tiny_finetuned, tmp_path, k=k))


def test_unknown_architecture(tmp_path, no_training):
    from transformers import AutoTokenizer, BloomConfig, BloomForSequenceClassification
    from conftest import write_tiny_assets
    _, data = write_tiny_assets(tmp_path / "assets")
    BloomForSequenceClassification(BloomConfig(n_layer=1, n_head=2, hidden_size=8, vocab_size=99,
                                               num_labels=2)).save_pretrained(tmp_path / "bloom")
    AutoTokenizer.from_pretrained(tmp_path / "assets" / "model").save_pretrained(tmp_path / "bloom")
    with pytest.raises(UnsupportedArchitectureError, match="'bloom'.*layouts it knows.*: BERT-style"):
        prune(cfg(tmp_path / "bloom", data, tmp_path / "out", k=1, mode="joint"))


def test_a_model_of_another_task_is_refused_in_one_line(tiny_finetuned, tmp_path, no_training):
    # transformers 5 tells it with a ValueError (4 raised a KeyError): a BERT classifier has no
    # encoder-decoder model to translate with
    with pytest.raises(UnsupportedArchitectureError, match=r"^headprune does not support 'bert' for translation "
                       r"\(transformers has no Seq2SeqLM model for it\)$"):
        prune(cfg(tiny_finetuned[0], "offline:ding-de-en", tmp_path / "out", task="translation", method="random",
                  k=1))
    assert not (tmp_path / "out").exists()


def test_missing_label_column(tiny_finetuned, tmp_path, no_training):
    with pytest.raises(DataError, match=r"no column\(s\) \['target'\]; its columns are \['text', 'label'\]"):
        prune(cfg(*tiny_finetuned, tmp_path, label_column="target"))


@pytest.mark.parametrize("name,content,message", [
    ("missing.csv", None, "does not exist"),
    ("broken.jsonl", '{"text": "a", "label": 1}\n{not json', r"broken.jsonl, line 2: not valid JSON \(Expecting"),
    ("data.parquet", "x", "cannot tell what data set"),
])
def test_unreadable_data(tiny_finetuned, tmp_path, no_training, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        prune(cfg(tiny_finetuned[0], path, tmp_path / "out"))


def test_output_folder_with_results_is_refused_and_kept(tiny_finetuned, tmp_path, no_training):
    (tmp_path / "results.json").write_text('{"precious": true}')
    with pytest.raises(OutputExistsError, match="already holds results.*--overwrite"):
        prune(cfg(*tiny_finetuned, tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == {"precious": True}


def test_pipelined_needs_a_finetuned_classifier(tiny_assets, tmp_path, no_training):
    with pytest.raises(ModelError, match="not a fine-tuned classifier.*headprune finetune"):
        prune(cfg(*tiny_assets, tmp_path))


def test_missing_model(tiny_assets, tmp_path, no_training):
    with pytest.raises(ModelError, match="^no such model folder: .*nowhere$"):
        prune(cfg(tmp_path / "nowhere", tiny_assets[1], tmp_path / "out"))
    with pytest.raises(ModelError, match="cannot load model 'someone/no-such-model': no such folder, and no hub"):
        prune(cfg("someone/no-such-model", tiny_assets[1], tmp_path / "out"))


def test_cli_reports_errors_without_a_traceback(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    result = cli(*prune_args(model, data, tmp_path), "--k", 100)
    assert result.returncode == 2
    assert "headprune: error: k=100 is more than the 8 heads" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoint").exists()


def test_two_processes_shard_the_data_and_resume_to_the_same_heads(tiny_finetuned, tmp_path):
    """torchrun with 2 CPU processes (gloo): half the steps per epoch; a killed 2-process run
    resumes to the uninterrupted run's heads (each process's dropout follows (seed, step, rank))."""
    model, data = tiny_finetuned

    def torchrun(out, env=None, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "headprune.cli",
               *map(str, prune_args(model, data, out, "--batch-size", 8, *extra))]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "ACCELERATE_USE_CPU": "1", **(env or {})})

    whole = torchrun(tmp_path / "whole", None, "--report-to", "tensorboard")
    assert whole.returncode == 0, whole.stderr[-2000:]  # (the tracker's end once ended the process group)
    assert list((tmp_path / "whole" / "tracker").rglob("events.out.tfevents.*"))
    assert whole.stdout.count('"metrics_pruned"') == 1 and whole.stderr.count("inputs are truncated to 64") == 1
    assert json.loads((tmp_path / "whole" / "results.json").read_text())["steps"] == 18  # 2 x ceil(144/16)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows]  # one schedule step a global step (not one per process: 0 from step 9)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:-1])) and lrs[-1] == 0 and len(lrs) == 18
    assert torchrun(tmp_path / "killed", {"HEADPRUNE_KILL_AT_STEP": "10"}).returncode != 0
    assert (tmp_path / "killed" / "checkpoint" / "state.json").exists()
    one = cli(*prune_args(model, data, tmp_path / "killed", "--batch-size", 8))  # one process: other examples a step
    assert one.returncode == 2 and "made with other settings (processes: 2 -> 1)" in one.stderr
    resumed = torchrun(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "whole" / "head_scores.json").read_text())
    b = json.loads((tmp_path / "killed" / "head_scores.json").read_text())
    assert [r["logit"] for r in b] == pytest.approx([r["logit"] for r in a], abs=1e-9)
    assert not (tmp_path / "killed" / "checkpoint").exists()


def test_processes_with_caches_of_their_own_agree_on_what_was_cached(tiny_finetuned, tmp_path):
    """As on two machines, each with its own cache, one of which ran the same prune before: the main
    process's cache decides for all (each deciding alone, their collectives paired wrongly: a hang)."""
    model, data = tiny_finetuned
    wrapper = tmp_path / "per_machine_cache.py"
    wrapper.write_text("import os, sys\n"
                       f"os.environ['HEADPRUNE_CACHE'] = '{tmp_path}/cache-' + os.environ.get('RANK', '0')\n"
                       "from headprune.cli import main\nsys.exit(main())\n")
    args = ["prune", "--model", model, "--dataset", data, "--k", 3, "--batch-size", 8, "--method", "activation"]
    earlier = subprocess.run([sys.executable, str(wrapper), *map(str, args), "--output-dir", tmp_path / "earlier"],
                             capture_output=True, text=True, timeout=300)
    assert earlier.returncode == 0, earlier.stderr[-2000:]
    both = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(wrapper),
                           *map(str, args), "--output-dir", tmp_path / "both"], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert both.returncode == 0, both.stderr[-2000:]
    results = json.loads((tmp_path / "both" / "results.json").read_text())
    assert results["scores_from_cache"] and results["kept_heads"] == json.loads(
        (tmp_path / "earlier" / "results.json").read_text())["kept_heads"]
