"""--pruning-loss distill: what the scores of a pipelined classifier learn from instead of the labels."""
import json

import pytest
import torch

from headprune import attach_gates
from headprune.config import PruneConfig, SweepConfig
from headprune.errors import ConfigError
from headprune.recipes import prune
from headprune.selection import pruning_loss
from headprune.sweep import planned_runs
from headprune.tasks import get_task
from conftest import tiny, tiny_model


def test_distillation_is_the_kl_from_the_whole_model_without_dropout_to_the_masked_one(batch):
    model = tiny_model()
    gates = attach_gates(model)
    mask = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0.])
    gates.set_mask(mask)
    batch = {**batch, "labels": torch.tensor([0, 2, 1])}
    distill = pruning_loss(PruneConfig(pruning_loss="distill"), get_task("classification"), gates)
    model.train()  # a pipelined run trains with dropout on
    torch.manual_seed(5)
    loss = distill(model, batch)
    assert model.training  # put back after the teacher's pass

    with torch.no_grad(), gates.override(torch.ones(8)):
        p = model.eval()(**batch).logits.softmax(-1)  # the teacher: every head, no dropout (draws no numbers)
    torch.manual_seed(5)
    q = model.train()(**batch).logits.softmax(-1)  # the student: the mask, the same dropout as inside
    by_hand = (p * (p.log() - q.log())).sum() / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() > 0.01  # the masked heads change the predictions


def test_the_label_loss_is_the_tasks_own():
    task = get_task("classification")
    assert pruning_loss(PruneConfig(), task, gates=None) == task.loss


def test_an_outer_override_is_back_after_an_inner_one(batch):
    model = tiny_model()
    gates = attach_gates(model)
    outer = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0.])
    with gates.override(outer):
        with gates.override(torch.ones(8)):
            assert gates().tolist() == [1.0] * 8
        assert gates().tolist() == outer.tolist()
    assert gates().tolist() == [1.0] * 8  # the fixed mask again


@pytest.mark.parametrize("settings,message", [
    (dict(method="michel"), "the scored methods have their own criteria"),
    (dict(mode="joint"), "is for pipelined classifiers"),
    (dict(task="causal-lm"), "is for pipelined classifiers"),
])
def test_distillation_is_refused_where_there_is_no_frozen_classifier(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(pruning_loss="distill", **settings)


def test_a_sweep_distils_only_its_pipelined_trained_runs():
    cfg = SweepConfig(methods=["dsp", "michel"], modes=["pipelined", "joint"], ks=[3], seeds=[0],
                      pruning_loss="distill")
    losses = {(run.method, run.mode): run.pruning_loss for run in planned_runs(cfg)}
    assert losses == {("dsp", "pipelined"): "distill", ("dsp", "joint"): "label", ("michel", "pipelined"): "label"}


def test_a_distilled_run_learns_from_the_kl_and_says_so(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    results = {loss: prune(tiny(model, data, tmp_path / loss, pruning_loss=loss)) for loss in ("label", "distill")}
    assert results["distill"]["config"]["pruning_loss"] == "distill" and results["distill"]["k"] == 3
    logs = {loss: [json.loads(line)["loss"] for line in (tmp_path / loss / "train_log.jsonl").read_text().splitlines()]
            for loss in results}
    # a label run's loss is the fine-tuned model's cross-entropy on its training data; the KL starts from 0
    # only where the masks keep every head, so both are positive and they differ
    assert all(x > 0 for x in logs["distill"]) and logs["distill"] != logs["label"]
