"""No run trains on garbage and calls it a success: non-finite options, a loss that turns NaN, a
language model task with nothing to predict or a model that is not causal, translation into the
same language, and parallel lines cut where they are not lines."""
import json

import pytest
from conftest import one_line_error

import headprune.tasks.classification as classification_task
from headprune.checkpoint import read_checkpoint
from headprune.config import FinetuneConfig, PruneConfig
from headprune.errors import ConfigError, ModelError, TrainingDivergedError
from headprune.parallel import load_parallel
from headprune.recipes import prune



@pytest.mark.parametrize("command,flag,value", [
    ("prune", "--pruning-lr", "nan"), ("prune", "--pruning-lr", "inf"), ("prune", "--t0", "nan"),
    ("prune", "--max-grad-norm", "nan"), ("prune", "--lr", "inf"), ("finetune", "--lr", "nan"),
    ("finetune", "--epochs", "nan"), ("finetune", "--epochs", "inf"), ("prune", "--warmup-ratio", "inf"),
])
def test_non_finite_options_are_refused(capsys, tmp_path, command, flag, value):
    line = one_line_error(capsys, [command, flag, value, "--output-dir", tmp_path / "o"])
    assert f"{flag[2:].replace('-', '_')}={float(value)}: must be a finite number" in line
    assert not (tmp_path / "o").exists()


def test_non_finite_yaml_values_are_refused(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("lr: .nan\n")
    assert "lr=nan: must be a finite number" in one_line_error(capsys, ["finetune", "--config", tmp_path / "c.yaml"])


# NaN times the loss: its gradient and the weights turn NaN; NaN plus it: its gradient stays finite
# (d(value + c)/d(value) = 1), and the loss itself must be checked, not only the weights
@pytest.mark.parametrize("poison", [lambda value: value * float("nan"), lambda value: value + float("nan")])
def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_finetuned, tmp_path, monkeypatch,
                                                                                poison):
    model, data = tiny_finetuned
    calls = []
    real_loss = classification_task.Classification.loss

    def loss(self, model, batch):
        calls.append(1)
        value = real_loss(self, model, batch)
        return poison(value) if len(calls) == 5 else value  # the 5th step's loss
    monkeypatch.setattr(classification_task.Classification, "loss", loss)
    cfg = PruneConfig(model=str(model), dataset=str(data), output_dir=str(tmp_path), k=3, mode="joint",
                      batch_size=16, checkpoint_every=2, epochs=2)
    with pytest.raises(TrainingDivergedError, match=r"became NaN or infinite by step 5 of 18; stopped \(the last good "
                                                    r"checkpoint \(step 4\) is kept in"):
        prune(cfg)
    assert len(calls) == 5 and read_checkpoint(tmp_path / "checkpoint")["step"] == 4
    assert not (tmp_path / "results.json").exists()


def test_a_language_model_needs_two_tokens_a_block():
    with pytest.raises(ConfigError, match="--max-length 1: a language model's blocks need at least 2 tokens"):
        PruneConfig(task="causal-lm", max_length=1)
    PruneConfig(task="causal-lm", max_length=2)


def test_an_encoder_is_not_a_causal_language_model(tiny_assets, tmp_path, monkeypatch):
    from conftest import write_tiny_lm
    _, text = write_tiny_lm(tmp_path / "lm", n_train=10, n_eval=5)
    monkeypatch.setattr("headprune.tasks.language_modeling.load_text", lambda *a, **k: pytest.fail("data was loaded"))
    with pytest.raises(ModelError, match="is a bert model whose attention is not causal .*needs a decoder-only"):
        prune(PruneConfig(task="causal-lm", model=str(tiny_assets[0]), dataset=str(text), mode="joint", k=3,
                          output_dir=str(tmp_path / "out")))


def test_translation_needs_two_languages():
    with pytest.raises(ConfigError, match="--source-lang and --target-lang are both 'en'"):
        FinetuneConfig(task="translation", source_lang="en", target_lang="en")
    FinetuneConfig(source_lang="en", target_lang="en")  # classification: the languages mean nothing


def test_parallel_lines_end_at_newlines_only(tmp_path):
    sources = [f"satz {i}" for i in range(10)]
    targets = [f"sentence {i}" for i in range(10)]
    sources[2] = "eins\u2028zwei"  # a line separator inside a sentence
    targets[4] = "one\x85two"  # NEL
    sources[6] = "drei\x0cvier"  # form feed
    for split in ("train", "test"):
        (tmp_path / f"{split}.de").write_text("\r\n".join(sources) + "\r\n", newline="")
        (tmp_path / f"{split}.en").write_text("\n".join(targets) + "\n")
    data = load_parallel(str(tmp_path))
    assert data.train["source"] == sources and data.train["target"] == targets


def test_jsonl_records_are_not_cut_at_a_line_separator_inside_a_string(tmp_path):
    from headprune.data import load_classification
    rows = [{"text": f"w{i}\u2028w{i + 1}", "label": i % 2} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    data = load_classification(str(tmp_path / "d.jsonl"))
    assert len(data.train) + len(data.evals["heldout"]) == 20


def test_parallel_data_that_cannot_be_read_is_one_line(tmp_path):
    """A folder where a file should be: a DataError naming it, no traceback."""
    from headprune.errors import DataError
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.de").mkdir()
    (pairs / "train.en").write_text("one\n")
    (pairs / "test.de").write_text("eins\n")
    (pairs / "test.en").write_text("one\n")
    with pytest.raises(DataError, match=f"cannot read {pairs / 'train.de'}"):
        load_parallel(str(pairs))


@pytest.mark.parametrize("splits,message", [
    ({"test": [{"de": "eins", "en": "one"}]}, "pairs has no train split \\(it has test\\)"),
    ({"train": [{"fr": "un", "en": "one"}]}, "its translations have no de \\(they have en, fr\\)"),
])
def test_a_datasets_translation_set_without_what_it_needs_is_one_line(monkeypatch, splits, message):
    import datasets

    from headprune.errors import DataError
    fake = datasets.DatasetDict({name: datasets.Dataset.from_dict({"translation": rows}) for name, rows in splits.items()})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    with pytest.raises(DataError, match=message):
        load_parallel("hf:pairs")


def test_a_weight_that_turns_infinite_stops_the_run_though_the_loss_was_finite(tiny_finetuned, tmp_path, monkeypatch):
    """The weights are checked too (one wait for the device for all of them): an infinite weight after
    the 5th step's update, whose loss was finite."""
    import torch
    from accelerate import Accelerator
    model, data = tiny_finetuned
    calls, real_clip = [], Accelerator.clip_grad_norm_

    def clip(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 5:
            with torch.no_grad():
                parameters[-1].fill_(float("inf"))
        return real_clip(self, parameters, max_norm, *args, **kwargs)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)
    cfg = PruneConfig(model=str(model), dataset=str(data), output_dir=str(tmp_path), k=3, mode="joint",
                      batch_size=16, checkpoint_every=2, epochs=2)
    with pytest.raises(TrainingDivergedError, match=r"by step 5 of 18; stopped \(the last good checkpoint \(step 4\)"):
        prune(cfg)


def test_a_run_that_diverges_before_its_first_checkpoint_leaves_no_empty_folder(tiny_finetuned, tmp_path, monkeypatch):
    """Nothing of the run is kept (no checkpoint was written): its output folder goes too, as a
    refused run's does, so that the next try does not find a folder it did not make."""
    model, data = tiny_finetuned
    real_loss = classification_task.Classification.loss
    monkeypatch.setattr(classification_task.Classification, "loss",
                        lambda self, model, batch: real_loss(self, model, batch) * float("nan"))
    out = tmp_path / "run"
    cfg = PruneConfig(model=str(model), dataset=str(data), output_dir=str(out), k=3, mode="joint",
                      batch_size=16, checkpoint_every=100, epochs=1)
    with pytest.raises(TrainingDivergedError, match="no checkpoint had been written"):
        prune(cfg)
    assert not out.exists(), sorted(p.relative_to(out) for p in out.rglob("*"))
