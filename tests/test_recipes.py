"""Fine-tune and prune end to end on a tiny model: what lands in the output folder, and that the
saved pruned model gives the masked model's outputs."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from headprune import attach_gates
from headprune.pruning import load_pruned
from headprune.config import PruneConfig
from headprune.recipes import best_epoch_keeper, prune


def prune_cfg(model, data, out, **kw):
    base = dict(model=str(model), dataset=str(data), epochs=1, batch_size=16, k=3,
                output_dir=str(out), checkpoint_every=0, t0=1.0, tf=1e-4, reconstruct="none")  # saved = masked
    return PruneConfig(**{**base, **kw})


def test_finetune_learns_and_writes_results(tiny_finetuned):
    folder = tiny_finetuned[0].parent
    results = json.loads((folder / "results.json").read_text())
    assert results["mode"] == "finetune"
    assert set(results["metrics"]) == {"heldout"}
    assert results["steps"] == 18  # 2 epochs x ceil(144 / 16)
    assert not (folder / "checkpoint.pt").exists()  # removed once results exist
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 19))  # 18 steps: a row each
    assert log[-1]["lr"] == 0.0  # linear decay reaches 0 at the last step
    assert log[0]["lr"] == pytest.approx(5e-5 * 17 / 18)


@pytest.mark.parametrize("mode,method,save_format", [("pipelined", "dsp", "physical"), ("joint", "dsp", "physical"),
                                                     ("pipelined", "ste", "zeroed"), ("pipelined", "voita", "physical")])
def test_prune_writes_everything_and_the_saved_model_equals_the_masked_one(
        tiny_finetuned, tiny_assets, tmp_path, mode, method, save_format):
    model_dir, data = tiny_finetuned if mode == "pipelined" else tiny_assets
    results = prune(prune_cfg(model_dir, data, tmp_path, mode=mode, method=method, save_format=save_format))

    assert results["method"] == method and results["mode"] == mode
    assert results["k"] == 3 and results["num_heads"] == 8 and len(results["kept_heads"]) == 3
    assert set(results["seconds"]) >= {"load", "prune", "evaluate_pruned", "save"}
    assert set(results["versions"]) >= {"torch", "transformers", "accelerate", "datasets", "headprune"}
    assert results["seed"] == 0
    assert set(results["metrics_pruned"]) == set(results["metrics_unpruned"]) == {"heldout"}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["kept_heads"] == [list(h) for h in results["kept_heads"]]

    logits = json.loads((tmp_path / "head_scores.json").read_text())
    assert len(logits) == 8 and sum(row["kept"] for row in logits) == 3
    top3 = sorted(logits, key=lambda r: -r["logit"])[:3]
    assert {(r["kind"], r["layer"], r["head"]) for r in top3} == set(map(tuple, results["kept_heads"]))
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved model loads again (zeroed: with plain transformers) and, pipelined, equals the
    # original weights under the mask; physical is smaller by the pruned heads.
    if save_format == "zeroed":
        saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    else:
        saved = load_pruned(tmp_path / "model")
        full = AutoModelForSequenceClassification.from_pretrained(model_dir)
        assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in full.parameters()) - 5 * 4 * 32 * 8 - 5 * 3 * 8
    assert saved.config.headprune["kept_heads"] == on_disk["kept_heads"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    batch = tokenizer(["w1 w5 w7", "w3 w4 w8 w9 w10"], padding=True, return_tensors="pt")
    if mode == "pipelined":  # the weights were frozen: the original model under the hard mask
        reference = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        gates = attach_gates(reference)
        mask = torch.tensor([float(tuple(h) in set(map(tuple, results["kept_heads"]))) for h in gates.heads])
        gates.set_mask(mask)
        with torch.no_grad():
            assert torch.allclose(saved(**batch).logits, reference(**batch).logits, atol=1e-6)


def test_pipelined_leaves_the_model_weights_untouched(tiny_finetuned, tmp_path):
    model_dir, data = tiny_finetuned
    prune(prune_cfg(model_dir, data, tmp_path, k=8, save_format="zeroed"))  # keep all: nothing zeroed
    before = AutoModelForSequenceClassification.from_pretrained(model_dir).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_temperature_follows_the_schedule_during_a_run(tiny_finetuned, tmp_path):
    """9 steps per epoch x 2 epochs, annealing over 12 steps from 1 to 1e-6: the temperature
    logged after step s (it was set before that step ran, at s - 1) is T0 * (Tf/T0)^((s-1)/12),
    then Tf from step 13 on."""
    model_dir, data = tiny_finetuned
    prune(prune_cfg(model_dir, data, tmp_path, k=4, epochs=2, t0=1.0, tf=1e-6, cooldown_steps=12))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 19))
    for row in log:
        expected = 1e-6 ** ((row["step"] - 1) / 12) if row["step"] <= 12 else 1e-6
        assert row["temperature"] == pytest.approx(expected)
    assert all(row["heads_on"] == 4 for row in log if row["step"] > 12)  # annealed: a hard top-4
    # the diagnosis: the scores learn while the mask is soft, and stop once it is hard
    assert log[0]["mask_gap"] > 0.5 and all(row["mask_gap"] < 1e-3 for row in log if row["step"] > 12)
    assert log[0]["score_grad_norm"] > 0 and all(row["score_grad_norm"] < 1e-6 for row in log if row["step"] > 12)
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "results.json").read_text())
    assert 1 <= results["live_steps"] <= 12  # the scores stop learning once the mask is hard
    assert results["live_steps"] == sum(row["score_grad_norm"] > 1e-6 for row in log)  # every step is logged


def test_a_shrinking_budget_is_logged_and_ends_at_k(tiny_finetuned, tmp_path):
    model_dir, data = tiny_finetuned
    # one budget over both layers (the default would give each layer 2 of its 4 heads, shrinking per layer)
    results = prune(prune_cfg(model_dir, data, tmp_path, k=4, epochs=2, shrink_fraction=0.5, allocation="global"))
    assert results["steps"] == 18 and results["shrink_steps"] == 9 and len(results["kept_heads"]) == 4
    n = results["num_heads"]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    # the row of step s logs the forward of step s - 1: n - (n - 4) (s - 1) / 9 heads, then 4
    assert [row["budget"] for row in log] == [round(n - (n - 4) * min(1, (row["step"] - 1) / 9)) for row in log]
    assert log[0]["budget"] == n and log[-1]["budget"] == 4
    assert f"the training budget fell from all {n} heads to 4 over the first 9 steps (4 from step 10)" in \
        (tmp_path / "report.md").read_text()


def test_a_pruned_model_can_be_pruned_further(tiny_finetuned, tmp_path):
    model_dir, data = tiny_finetuned
    first = prune(prune_cfg(model_dir, data, tmp_path / "first", k=5))
    second = prune(prune_cfg(tmp_path / "first" / "model", data, tmp_path / "second", k=2, method="ste"))
    assert second["num_heads"] == 5 and len(second["kept_heads"]) == 2  # in the smaller model's numbering
    assert second["metrics_unpruned"] == first["metrics_pruned"]  # it starts where the first ended
    records = [json.loads((tmp_path / run / "model" / "config.json").read_text())["headprune"]["kept_heads"]
               for run in ("first", "second")]
    assert len(records[1]) == 2 and all(h in records[0] for h in records[1])  # original numbering
    assert sum(p.numel() for p in load_pruned(tmp_path / "second" / "model").parameters()) < \
        sum(p.numel() for p in load_pruned(tmp_path / "first" / "model").parameters())


@pytest.mark.parametrize("allocation", ["default", "uniform"])
def test_a_model_with_a_layer_pruned_empty_is_pruned_again_by_its_other_layers(tiny_finetuned, tmp_path, allocation):
    """Spreading k evenly over the layers leaves out a layer with no heads left (it divided by zero)."""
    from headprune.pruning import save_pruned
    from headprune.sites import find_sites
    model_dir, data = tiny_finetuned
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    save_pruned(model, tmp_path / "empty0", [("encoder", 1, h) for h in range(4)], AutoTokenizer.from_pretrained(model_dir))
    results = prune(PruneConfig(model=str(tmp_path / "empty0"), dataset=str(data), output_dir=str(tmp_path / "again"),
                                k=3, epochs=1, batch_size=16, checkpoint_every=0, allocation=allocation))
    assert len(results["kept_heads"]) == 3 and {layer for _, layer, _ in results["kept_heads"]} == {1}
    assert [site.num_heads for site in find_sites(load_pruned(tmp_path / "again" / "model"))] == [0, 3]


def test_a_pruned_model_can_be_fine_tuned_again_and_stays_pruned(tiny_finetuned, tmp_path):
    from headprune.config import FinetuneConfig
    from headprune.recipes import finetune
    model_dir, data = tiny_finetuned
    prune(prune_cfg(model_dir, data, tmp_path / "pruned", k=5))
    finetune(FinetuneConfig(model=str(tmp_path / "pruned" / "model"), dataset=str(data), epochs=1, batch_size=16,
                            output_dir=str(tmp_path / "again"), checkpoint_every=0))
    before, after = (load_pruned(tmp_path / run / "model") for run in ("pruned", "again"))
    assert after.config.headprune["kept_heads"] == before.config.headprune["kept_heads"]
    shapes = {name: p.shape for name, p in before.named_parameters()}
    assert {name: p.shape for name, p in after.named_parameters()} == shapes  # the heads stay removed
    assert any(not torch.equal(p, dict(after.named_parameters())[name]) for name, p in before.named_parameters())


def test_a_joint_run_settles_for_its_last_two_thirds(tiny_assets, tmp_path):
    """18 steps: the scores learn in the first 6 (noise_gap: how many sampled heads the run will
    not keep) while the budget shrinks to k, then the kept heads are fixed and only the weights train."""
    model_dir, data = tiny_assets
    results = prune(prune_cfg(model_dir, data, tmp_path, mode="joint", k=4, epochs=2, t0=1.0, tf=1e-4))
    assert results["settle_step"] == 6 and results["cooldown_steps"] == 6
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    learning, settled = log[:6], log[6:]
    assert all("noise_gap" in row and 0 <= row["noise_gap"] <= 4 for row in learning)
    # the budget falls from every head (step 0: nothing to choose, no gradient) to 4 over those 6 steps
    n = results["num_heads"]
    assert [row["budget"] for row in learning] == [round(n - (n - 4) * step / 6) for step in range(6)]
    assert learning[0]["score_grad_norm"] == 0 and learning[1]["score_grad_norm"] > 0
    assert all("noise_gap" not in row and row["score_grad_norm"] == 0 and row["heads_on"] == 4 for row in settled)
    assert results["live_steps"] <= 6
    report = (tmp_path / "report.md").read_text()
    assert f"gradient (above 1e-06) in {results['live_steps']} of 18 steps; after step 6 the kept heads were fixed" in report


class Acc:
    is_main_process = True

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass


def keep_best(tmp_path, scores, higher_is_better):
    model = nn.Linear(2, 1)
    epoch = [0]
    task = SimpleNamespace(metric="m", higher_is_better=higher_is_better,
                           evaluate=lambda acc, model, evals, collate, cfg: {"dev": scores[epoch[0] - 1]})
    extra = {}
    on_epoch_end, restore = best_epoch_keeper(SimpleNamespace(select_by="dev"), task, Acc(), model, {"dev": []},
                                              None, tmp_path, extra)
    for epoch[0] in range(1, len(scores) + 1):
        with torch.no_grad():
            model.weight.fill_(epoch[0])  # the weights of epoch e are all e
        on_epoch_end(epoch[0])
    restore()
    return extra["best"], model.weight[0, 0].item()


@pytest.mark.parametrize("higher, scores, best", [(True, [0.5, 0.8, 0.6, 0.8], 2), (False, [9.0, 4.0, 6.0, 4.0], 2)])
def test_the_best_epochs_weights_are_kept(tmp_path, higher, scores, best):
    kept, weight = keep_best(tmp_path, scores, higher)
    assert kept == {"epoch": best, "score": scores[best - 1]}
    assert weight == best  # its weights loaded back, not the last epoch's


# the "head scores had a gradient in N of M steps" count covers the whole run, checkpoints or not


def test_the_live_steps_count_every_step_across_checkpoints(tiny_finetuned, tmp_path):
    model_dir, data = tiny_finetuned
    # 18 steps, checkpoints after steps 5, 10, 15 and 18 (each flushes the gradient norms kept so far)
    prune(prune_cfg(model_dir, data, tmp_path, k=4, epochs=2, t0=1.0, tf=1e-6, cooldown_steps=12, checkpoint_every=5))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 19))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["live_steps"] >= 1
    assert results["live_steps"] == sum(row["score_grad_norm"] > 1e-6 for row in log)
