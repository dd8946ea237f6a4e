"""The model card in every saved model folder (issue 22): the Hub's header, the pruning facts, a
command that rebuilds the same settings, and how to load it."""
import dataclasses
import shlex

from conftest import tiny
from headprune import config as cfgmod
from headprune.card import command_of, model_card
from headprune.cli import parser
from headprune.recipes import prune


def settings_of(command: str, cls):
    args = parser().parse_args(shlex.split(command)[1:])
    return cfgmod.build_config(cls, args)


def test_a_pruned_models_card_says_what_was_kept_and_how_it_was_made(tiny_finetuned, tmp_path):
    cfg = tiny(*tiny_finetuned, tmp_path / "run dir", k=3, reconstruct="bias", michel_exact=False)
    results = prune(cfg)
    card = (tmp_path / "run dir" / "model" / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: text-classification" in header
    assert "- headprune\n- pruned\n- attention-head-pruning\n- dsp" in header
    assert "base_model" not in header  # a local folder whose card names none
    assert "# dsp pipelined: 3 of 8 heads kept" in card and "reconstruction `bias`" in card
    per_layer = [sum(h[1] == layer for h in results["kept_heads"]) for layer in (0, 1)]
    assert f"| encoder | {per_layer[0]} | {per_layer[1]} |" in card and results["layers"] == {"encoder": 2}
    # a last layer that keeps nothing still has its column
    first_only = {**results, "kept_heads": [h for h in results["kept_heads"] if h[1] == 0] or [["encoder", 0, 0]]}
    assert "| layer 0 | layer 1 |" in model_card(first_only, "headprune prune") and \
        f"| encoder | {len(first_only['kept_heads'])} | 0 |" in model_card(first_only, "headprune prune")
    split = next(iter(results["metrics_pruned"]))
    assert (f"| {split} | {results['metrics_unpruned'][split]:.4f} | "
            f"{results['metrics_before_reconstruction'][split]:.4f} | {results['metrics_pruned'][split]:.4f} |") in card
    assert 'model = load_pruned("model")' in card and "stock `from_pretrained` cannot build" in card
    # the size from the shapes: a head of the tiny BERT (width 32, 4 heads of 8) holds 3 x (32 x 8 + 8)
    # query/key/value and 32 x 8 output weights; its attention FLOPs at L tokens are
    # 2L x 32 x 24 (projections) + 4 L^2 x 8 (two products) + 2L x 8 x 32 (output)
    size, length = results["size"], min(cfg.max_length, 64)  # (the tiny BERT's positions)
    assert size["length"] == length and "kv_cache_bytes_per_token" not in size["pruned"]
    assert size["unpruned"]["parameters"] - size["pruned"]["parameters"] == 5 * (3 * (32 * 8 + 8) + 32 * 8)
    per_head = 2 * length * 32 * 24 + 4 * length ** 2 * 8 + 2 * length * 8 * 32
    assert (size["unpruned"]["attention_flops"], size["pruned"]["attention_flops"]) == (8 * per_head, 3 * per_head)
    assert f"| attention FLOPs, one sequence of {length} tokens | {8 * per_head:,} | {3 * per_head:,} | 37.5% |" in card
    command = card.split("Made with:\n\n```\n")[1].split("\n```")[0]
    assert settings_of(command, cfgmod.PruneConfig) == cfg  # quoted paths, booleans and lists survive


def test_every_kind_has_its_row_and_a_model_pruned_before_is_named_the_baseline():
    results = {"method": "random", "mode": "pipelined", "k": 2, "num_heads": 12, "unit": "head", "task": "classification",
               "model": "t5", "dataset": "d.jsonl", "layers": {"encoder": 2, "decoder": 1, "cross": 1},
               "kept_heads": [["encoder", 0, 1], ["decoder", 0, 2]], "metrics_pruned": {"test": 0.5},
               "metrics_unpruned": {"test": 0.75}}
    card = model_card(results, "headprune prune")
    # a kind that kept no head has its row; a kind with fewer layers has no cell for the others
    assert "| encoder | 1 | 0 |" in card and "| decoder | 1 | – |" in card and "| cross | 0 | – |" in card
    assert "| split | unpruned | this model |" in card and "pruned before" not in card
    again = model_card({**results, "pruned_before": True}, "headprune prune")
    assert "| split | input model (pruned before) | this model |" in again
    assert "The input model was pruned before: it is the baseline of the tables below." in again


def test_the_command_of_the_defaults_is_the_bare_command():
    assert command_of("prune", cfgmod.PruneConfig()) == "headprune prune"
    cfg = cfgmod.PruneConfig(k_per_kind=[2, 3], fisher_rearrange=False, output_dir="a b")
    command = command_of("prune", cfg)
    assert "--k-per-kind 2 3" in command and "--no-fisher-rearrange" in command and "'a b'" in command
    assert dataclasses.asdict(settings_of(command, cfgmod.PruneConfig)) == dataclasses.asdict(cfg)
    # the budgets a target works out (an encoder-decoder's cache: one per kind) are not part of the command
    targeted = cfgmod.PruneConfig(task="translation", target_kv_cache=0.5)
    targeted.k, targeted.k_per_kind = 20, [8, 4, 8]
    assert command_of("prune", targeted) == "headprune prune --task translation --target-kv-cache 0.5"


def test_a_fine_tuned_models_card_names_its_base(tiny_finetuned):
    card = (tiny_finetuned[0] / "README.md").read_text()
    assert "- headprune\n" in card and "pruned" not in card.split("---")[1]
    assert "headprune finetune --model" in card
    assert "| split | this model |" in card and "unpruned" not in card  # nothing to compare with
