"""Pruning inside a user's own Trainer (issue 22): a tiny Trainer run with the callback keeps exactly
k heads, logs the selector's values, trains the weights with the user's optimizer and the scores with
their own, and saves a pruned model that loads to the same outputs."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_model
from headprune.errors import CheckpointError, ConfigError
from headprune.integrations import STATE_FOLDER, HeadPruningCallback
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


def test_query_positions_of_a_model_without_grouped_queries_are_refused_before_the_gates_go_on():
    """A Llama whose every key/value head has one query head: a query position would be a layer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    callback = HeadPruningCallback(k=3, unit="query")
    args = SimpleNamespace(fp16=False, gradient_checkpointing=False, output_dir="unused")
    with pytest.raises(ConfigError, match="each group of this model holds one query head"):
        callback.on_train_begin(args, SimpleNamespace(max_steps=10, global_step=0), None, model=model)
    assert not hasattr(model, "head_gates")


def trainer_for(tmp_path, model, callback, max_steps=12, **arguments):
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                             **{"save_strategy": "no", **arguments})
    return Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback])


@pytest.mark.parametrize("method", ["dsp", "voita"])
def test_each_micro_batch_of_an_accumulated_step_draws_its_own_noise(tmp_path, monkeypatch, method):
    """As the reference draws at every forward: with gradient_accumulation_steps=2, a step's two
    micro-batches train on two draws of the noise (one temperature, the step's)."""
    import headprune.methods.dsp as dsp
    import headprune.methods.voita as voita
    draws = []
    if method == "dsp":
        real = dsp.sample_gumbel
        monkeypatch.setattr(dsp, "sample_gumbel", lambda like, gen: draws.append(real(like, gen)) or draws[-1])
    else:
        real = voita.hard_concrete_sample
        monkeypatch.setattr(voita, "hard_concrete_sample", lambda log_a, u: draws.append(u) or real(log_a, u))
    callback = HeadPruningCallback(k=3, method=method, output_dir=str(tmp_path / "pruned"), seed=0,
                                   settle_fraction=0.0)  # (settled steps draw none)
    trainer_for(tmp_path, tiny_model("bert", layers=2), callback, max_steps=3, gradient_accumulation_steps=2).train()
    assert len(draws) == 6 and len({tuple(d.tolist()) for d in draws}) == 6
    from headprune.randomness import generator
    first = dsp.sample_gumbel(draws[0], generator("cpu", 0, "gumbel", 0)) if method == "dsp" else None
    assert first is None or torch.equal(draws[0], first)  # a step's first draw: the one seeded by its step


def test_voitas_l0_penalty_reaches_the_scores(tmp_path):
    """The Trainer's loss does not know the penalty: the callback adds its gradient each step, so a
    larger l0_lambda closes the gates further (with none, the scores learn from the loss alone)."""
    log_a = {}
    for l0_lambda in (0.0, 1.0):
        callback = HeadPruningCallback(k=3, method="voita", output_dir=str(tmp_path / f"pruned{l0_lambda}"), seed=0,
                                       l0_lambda=l0_lambda)
        trainer_for(tmp_path / str(l0_lambda), tiny_model("bert", layers=2), callback).train()
        log_a[l0_lambda] = callback.optimizer.param_groups[0]["params"][0].detach()
    # the penalty's gradient is positive for every gate: each one lower, by about lr x steps
    assert (log_a[1.0] < log_a[0.0] - 0.005).all()


def test_resume_from_checkpoint_brings_the_head_scores_back(tmp_path, batch):
    """A Trainer stopped by an error after its checkpoint at step 6 and resumed from it (the same
    Trainer, model and callback: the gates the stopped train() left are replaced) learns what the
    uninterrupted run learns; the scores' state is in checkpoint-6/headprune/."""
    from transformers import TrainerCallback

    whole = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "whole-pruned"), seed=0)
    trainer_for(tmp_path / "whole", tiny_model("bert", layers=2), whole, save_strategy="steps", save_steps=6).train()

    class StopAtStep7(TrainerCallback):
        stop = True

        def on_step_begin(self, args, state, control, **kwargs):
            if self.stop and state.global_step == 7:
                raise KeyboardInterrupt

    stopper = StopAtStep7()
    callback = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "pruned"), seed=0)
    model = tiny_model("bert", layers=2)
    trainer = trainer_for(tmp_path / "stopped", model, callback, save_strategy="steps", save_steps=6)
    trainer.add_callback(stopper)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "stopped" / "trainer" / "checkpoint-6" / "headprune" / "state.json").is_file()
    stopper.stop = False
    trainer.train(resume_from_checkpoint=True)
    assert callback.kept_heads == whole.kept_heads
    scores = [c.optimizer.param_groups[0]["params"][0].detach() for c in (callback, whole)]
    assert torch.allclose(scores[0], scores[1], atol=1e-6) and not torch.equal(scores[0], torch.zeros_like(scores[0]))
    assert int(next(iter(callback.optimizer.state.values()))["step"]) == 12  # the scores' AdamW: 6 + 6 steps


def test_resuming_without_the_scores_state_is_refused_in_one_line(tmp_path):
    from headprune.errors import CheckpointError
    callback = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "pruned"), seed=0)
    trainer = trainer_for(tmp_path, tiny_model("bert", layers=2), callback, max_steps=4, save_strategy="steps",
                          save_steps=2)
    trainer.train()
    for folder in (tmp_path / "trainer").glob("checkpoint-*/headprune"):
        import shutil
        shutil.rmtree(folder)
    model = tiny_model("bert", layers=2)
    again = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "pruned"), overwrite=True, seed=0)
    with pytest.raises(CheckpointError, match="resumes at step 4, but .*checkpoint-4/headprune is missing"):
        trainer_for(tmp_path, model, again, max_steps=6).train(resume_from_checkpoint=True)
    assert not hasattr(model, "head_gates")


TWO_PROCESSES = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments
from conftest import tiny_model
from test_integrations import examples
from headprune.integrations import HeadPruningCallback
from headprune.sites import find_sites

out, processes = sys.argv[1], int(os.environ.get("WORLD_SIZE", "1"))
model = tiny_model("bert", layers=2)
for module in model.modules():  # no dropout: 1 and 2 processes see the same global batches
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
callback = HeadPruningCallback(k=3, method="dsp", output_dir=out + "/pruned", seed=0)
args = TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=16 // processes, learning_rate=1e-3,
                         report_to="none", save_strategy="no", seed=0, disable_tqdm=True, max_grad_norm=0.05)
trainer = Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback])
trainer.train()
rank = int(os.environ.get("RANK", "0"))
save_file({{n: p.detach().contiguous() for n, p in model.state_dict().items()}}, f"{{out}}/rank{{rank}}.safetensors")
json.dump({{"kept": callback.kept_heads, "heads": sum(s.num_heads for s in find_sites(model))}},
          open(f"{{out}}/rank{{rank}}.json", "w"))
'''


def test_two_processes_train_and_prune_alike(tmp_path):
    """torchrun with 2 CPU processes (gloo), the Trainer's clipping on: the scores' gradients are
    averaged before it, so both processes' weights stay equal (each clipped by its own norm, they
    drifted apart); every process's model loses the same heads, and they are the 1-process run's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    script = tmp_path / "train.py"
    script.write_text(TWO_PROCESSES.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    for out, launcher in ((tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
                          (tmp_path / "one", [sys.executable])):
        run = subprocess.run([*launcher, str(script), str(out)], capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert ranks[0] == ranks[1] == one and one["heads"] == 3
    weights = [load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    loaded = load_pruned(tmp_path / "two" / "pruned")
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in weights[0].items())


def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path):
    """The scores saved for k=3 would go on learning a k=2 choice with another schedule's state:
    refused, naming what changed, before the gates go on."""
    callback = HeadPruningCallback(k=3, method="dsp", output_dir=str(tmp_path / "pruned"), seed=0)
    trainer_for(tmp_path, tiny_model("bert", layers=2), callback, max_steps=4, save_strategy="steps",
                save_steps=2).train()
    model = tiny_model("bert", layers=2)
    again = HeadPruningCallback(k=2, method="dsp", output_dir=str(tmp_path / "pruned"), overwrite=True, seed=0)
    with pytest.raises(CheckpointError, match=r"saved with other settings \(k: 3 -> 2\)"):
        trainer_for(tmp_path, model, again, max_steps=6).train(resume_from_checkpoint=True)
    assert not hasattr(model, "head_gates")


def test_on_save_writes_the_scores_state_only_where_the_trainer_saves(tmp_path):
    callback = HeadPruningCallback(k=3, method="dsp")
    selector = nn.Linear(2, 1)
    callback.gates = SimpleNamespace(selector=selector)
    callback.optimizer = torch.optim.AdamW(selector.parameters())
    callback.scheduler = torch.optim.lr_scheduler.LambdaLR(callback.optimizer, lambda step: 1.0)
    (tmp_path / "checkpoint-6").mkdir()
    state = SimpleNamespace(global_step=6)
    # another process of a multi-process run (should_save False) writes nothing into the shared folder
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=False), state, None)
    assert not (tmp_path / "checkpoint-6" / STATE_FOLDER).exists()
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path), should_save=True), state, None)
    assert (tmp_path / "checkpoint-6" / STATE_FOLDER / "state.json").is_file()
