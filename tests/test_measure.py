"""FLOPs by hand, and the side-by-side measurement on a tiny pruned model."""
import json

import pytest

from conftest import tiny_model
from headprune.cli import main
from headprune.measure import attention_flops, total_flops
from headprune.pruning import remove_heads, save_pruned


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flops_match_the_hand_count(attn):
    model = tiny_model("bert", attn)  # 2 layers, hidden 32, 4 heads of 8, FFN 37, 3 labels
    B, T, H, I = 2, 5, 32, 37
    attention_per_layer = 2 * B * T * H * 96 + 2 * 2 * B * 4 * T * T * 8 + 2 * B * T * 32 * H
    ffn_per_layer = 2 * B * T * H * I * 2
    pooler_and_classifier = 2 * B * H * H + 2 * B * H * 3  # on the first token only
    assert attention_flops(model, B, T) == 2 * attention_per_layer
    assert total_flops(model, B, T) == 2 * (attention_per_layer + ffn_per_layer) + pooler_and_classifier
    remove_heads(model, [("encoder", 1, 0)])  # layer 0: no heads; layer 1: one head
    one_head = 2 * B * T * H * 24 + 2 * 2 * B * 1 * T * T * 8 + 2 * B * T * 8 * H
    assert attention_flops(model, B, T) == one_head
    assert total_flops(model, B, T) == one_head + 2 * ffn_per_layer + pooler_and_classifier


def test_measure_command_compares_side_by_side(tmp_path, capsys):
    model = tiny_model("bert", layers=3)
    save_pruned(model, tmp_path / "pruned", [("encoder", 2, 1)])
    assert main(["measure", "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "1", "4", "--lengths", "16",
                 "--repeats", "3", "--output-dir", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    assert table.count("\n| 1 | 16 |") == 1 and "| 4 | 16 |" in table
    result = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert result["heads"] == {"original": 12, "pruned": 1}
    assert result["parameters"]["original"] - result["parameters"]["pruned"] == 11 * (3 * (32 * 8 + 8) + 32 * 8)
    for row in result["settings"]:
        assert row["predicted_speedup"] == pytest.approx(row["flops"]["original"] / row["flops"]["pruned"])
        assert row["speedup"] > 0 and row["seconds"]["pruned"] > 0
    assert (tmp_path / "m" / "measure.md").read_text() == table.rstrip("\n") + "\n"  # print adds one
    before = (tmp_path / "m" / "measure.json").read_text()
    assert main(["measure", "--pruned", str(tmp_path / "pruned"), "--output-dir", str(tmp_path / "m")]) == 2
    assert "already holds measure.json" in capsys.readouterr().err
    assert (tmp_path / "m" / "measure.json").read_text() == before


def test_measure_needs_a_pruned_model(capsys):
    assert main(["measure"]) == 2
    assert "--pruned" in capsys.readouterr().err
