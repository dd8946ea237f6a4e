"""FLOPs by hand, and the side-by-side measurement on a tiny pruned model."""
import json

import pytest

from conftest import tiny_model
from headprune.cli import main
from headprune.measuring import attention_flops, total_flops
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


def test_measure_on_cuda_without_it_is_one_line(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["measure", "--pruned", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


def test_measure_puts_the_measured_speed_into_the_model_card(tmp_path, capsys):
    save_pruned(tiny_model("bert"), tmp_path / "pruned", [("encoder", 0, 1), ("encoder", 1, 3)])
    card = tmp_path / "pruned" / "README.md"
    card.write_text("---\nlibrary_name: transformers\n---\n\n# dsp pipelined: 2 of 8 heads kept\n\nMade with: ...\n")
    args = ["measure", "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "2", "--lengths", "8", "--repeats", "2"]
    assert main([*args, "--card"]) == 0
    first = card.read_text()
    assert first.startswith("---\nlibrary_name: transformers\n---\n\n# dsp pipelined: 2 of 8 heads kept\n\nMade with: ...\n")
    assert first.count("## Measured speed") == 1 and "| 2 | 8 |" in first
    assert "headprune measure --pruned " in first and "--card" in first  # how it was measured
    assert main([*args, "--lengths", "12", "--card"]) == 0  # measured again: the section is replaced
    second = card.read_text()
    assert second.count("## Measured speed") == 1 and "| 2 | 12 |" in second and "| 2 | 8 |" not in second
    assert main(args) == 0 and card.read_text() == second  # without --card the card is left alone


@pytest.mark.parametrize("arch", ["deberta-v2", "deberta", "modernbert"])
def test_measure_on_the_newer_encoders(arch, tmp_path):
    from headprune.config import MeasureConfig
    from headprune.measuring import measure
    save_pruned(tiny_model(arch, layers=3), tmp_path, [("encoder", 0, 1), ("encoder", 2, 2)])
    result = measure(MeasureConfig(pruned=str(tmp_path), batch_sizes=[2], lengths=[8], repeats=2, warmup=0,
                                   attn_implementation="eager"), progress=lambda *_: None)
    assert result["heads"] == {"original": 12, "pruned": 2}
    row = result["settings"][0]
    assert row["attention_flops"]["pruned"] < row["attention_flops"]["original"] and row["speedup"] > 0
