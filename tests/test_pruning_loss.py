"""--pruning-loss distill: what the scores of a pipelined run learn from instead of the labels: the KL
divergence from the unpruned model's outputs, per example or per target token."""
import json

import pytest
import torch

from headprune import attach_gates
from headprune.config import PruneConfig, SweepConfig
from headprune.errors import ConfigError
from headprune.recipes import prune
from headprune.selection import pruning_loss
from headprune.sweeping import planned_runs
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


def kl_by_hand(model, gates, inputs, mask):
    """Per position: sum over the vocabulary of p (log p - log q), p the whole model's, q the masked one's."""
    with torch.no_grad():
        with gates.override(torch.ones(gates.num_heads)):
            p = model(**inputs).logits.log_softmax(-1)
        with gates.override(mask):
            q = model(**inputs).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def test_a_language_model_distils_every_next_token_its_loss_reads():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)).eval()
    gates = attach_gates(model)  # 2 KV groups a layer
    mask = torch.tensor([1, 0, 0, 1.])
    gates.set_mask(mask)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, 3] = -100  # a token the loss does not read: position 2 predicts it
    distill = pruning_loss(PruneConfig(task="causal-lm", pruning_loss="distill"), get_task("causal-lm"), gates)
    loss = distill(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    kl = kl_by_hand(model, gates, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, mask)
    read = torch.ones(2, 5, dtype=torch.bool)  # positions 0-4 predict tokens 1-5
    read[0, 2] = False
    assert loss.item() == pytest.approx(kl[:, :-1][read].mean().item(), rel=1e-5)
    assert loss.item() > 0.01


def test_a_translation_model_distils_the_target_tokens_and_not_the_padding():
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=32, encoder_layers=1, decoder_layers=1,
                                                    encoder_attention_heads=4, decoder_attention_heads=4,
                                                    encoder_ffn_dim=37, decoder_ffn_dim=37, init_std=0.3,
                                                    max_position_embeddings=32)).eval()
    gates = attach_gates(model)  # encoder, decoder and cross heads: 12
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0.])
    gates.set_mask(mask)
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(3, 50, (2, 5), generator=g), "attention_mask": torch.ones(2, 5, dtype=torch.long),
              "decoder_input_ids": torch.randint(3, 50, (2, 4), generator=g)}
    labels = torch.randint(3, 50, (2, 4), generator=g)
    labels[1, 2:] = -100  # the shorter target's padding
    distill = pruning_loss(PruneConfig(task="translation", pruning_loss="distill"), get_task("translation"), gates)
    loss = distill(model, {**inputs, "labels": labels})
    kl = kl_by_hand(model, gates, inputs, mask)
    assert loss.item() == pytest.approx(kl[labels != -100].mean().item(), rel=1e-5)
    assert loss.item() > 0.01


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
    (dict(mode="joint"), "is for pipelined runs"),
])
def test_distillation_is_refused_where_there_is_no_frozen_teacher(settings, message):
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
