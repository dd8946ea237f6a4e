"""Pruning inside a user's own Trainer (issue 22): a tiny Trainer run with the callback keeps exactly
k heads, logs the selector's values, trains the weights with the user's optimizer and the scores with
their own, and saves a pruned model that loads to the same outputs."""
import pytest
import torch

from conftest import tiny_model
from headprune.errors import ConfigError
from headprune.integrations import HeadPruningCallback
from headprune.methods import resolve_schedule
from headprune.methods.dsp import geometric_temperature
from headprune.pruning import load_pruned
from headprune.sites import find_sites


def examples(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n, 10), generator=g)
    labels = (ids == 7).any(1).long() + (ids == 9).any(1).long()  # 3 classes from the words
    return [{"input_ids": i, "attention_mask": torch.ones(10, dtype=torch.long), "labels": y} for i, y in zip(ids, labels)]


def test_a_trainer_with_the_callback_keeps_k_heads_and_saves_them(tmp_path, batch):
    from transformers import Trainer, TrainingArguments
    model = tiny_model("bert", layers=2)
    bias_before = model.bert.encoder.layer[0].attention.output.dense.bias.detach().clone()  # never sliced
    callback = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "pruned"), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=3, report_to="none", save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback])
    trainer.train()
    assert len(callback.kept_heads) == 3
    assert not hasattr(model, "head_gates")  # the gates are gone, the model pruned in place
    assert sum(site.num_heads for site in find_sites(model)) == 3
    # the weights learned with the Trainer's optimizer (the scores are not in it)
    assert not torch.equal(model.bert.encoder.layer[0].attention.output.dense.bias, bias_before)
    assert int(next(iter(callback.optimizer.state.values()))["step"]) == 12  # the scores' own AdamW stepped
    assert all(not any(p is q for q in trainer.optimizer.param_groups[0]["params"])
               for p in callback.optimizer.param_groups[0]["params"])
    # the heads' temperature follows headprune's joint schedule for the Trainer's 12 steps
    logged = [(entry["step"], entry["headprune/temperature"]) for entry in trainer.state.log_history
              if "headprune/temperature" in entry]
    schedule = resolve_schedule(callback.cfg, 12)
    assert [step for step, _ in logged] == [3, 6, 9, 12]
    for step, temperature in logged:  # the selector's step when the log line was written: the last one run
        expected = geometric_temperature(step - 1, schedule["t0"], schedule["tf"], schedule["cooldown_steps"])
        assert temperature == pytest.approx(expected)
    loaded = load_pruned(tmp_path / "pruned")
    assert loaded.config.headprune["kept_heads"] == [list(h) for h in callback.kept_heads]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)


def test_the_callback_refuses_dropout_off_which_the_trainer_would_not_honour():
    with pytest.raises(ConfigError, match="pruning_dropout='off' is for headprune's own loop"):
        HeadPruningCallback(k=2, pruning_dropout="off")


def test_the_callback_refuses_methods_that_train_nothing():
    with pytest.raises(ConfigError, match="method must be one of dsp, ste, voita, not 'flap'"):
        HeadPruningCallback(k=3, method="flap")


def trained_with(tmp_path, batch, **arguments):
    from transformers import Trainer, TrainingArguments
    model = tiny_model("bert", layers=2)
    callback = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "pruned"), seed=0)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, **arguments)
    Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback]).train()
    assert model.is_gradient_checkpointing is arguments.get("gradient_checkpointing", False)
    model.eval()
    with torch.no_grad():
        return callback.kept_heads, callback.optimizer.param_groups[0]["params"][0].detach(), model(**batch).logits


def test_the_trainer_s_activation_checkpointing_learns_the_same_heads(tmp_path, batch):
    """The Trainer's own `gradient_checkpointing` (non-reentrant, transformers 5's default): the
    recomputed layers read the mask of their forward pass, so scores and weights learn as without."""
    heads, scores, logits = trained_with(tmp_path / "plain", batch)
    heads_c, scores_c, logits_c = trained_with(tmp_path / "checkpointed", batch, gradient_checkpointing=True)
    assert heads_c == heads
    assert not torch.equal(scores, torch.zeros_like(scores))  # the scores learned something
    assert torch.allclose(scores_c, scores, atol=1e-6) and torch.allclose(logits_c, logits, atol=1e-5)


def test_reentrant_checkpointing_is_refused_in_one_line(tmp_path, batch):
    with pytest.raises(ConfigError, match="use_reentrant"):
        trained_with(tmp_path, batch, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": True})


def test_fp16_is_refused_before_the_gates_go_on():
    """Its loss scaler unscales the Trainer's parameters only: the head scores' gradients would reach the
    clipping scaled (CUDA only, so the Trainer's arguments are stood in for)."""
    from types import SimpleNamespace
    model = tiny_model()
    callback = HeadPruningCallback(k=3)
    args = SimpleNamespace(fp16=True, gradient_checkpointing=False, output_dir="unused")
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        callback.on_train_begin(args, SimpleNamespace(max_steps=10), None, model=model)
    assert not hasattr(model, "head_gates")
