"""FLOPs by hand, and the side-by-side measurement on a tiny pruned model."""
import json
import logging

import pytest

from conftest import one_line_error, tiny_model, write_tiny_lm
from headprune.cli import main
from headprune.measuring import NOISY, _note, counted_flops
from headprune.pruning import load_pruned, remove_heads, save_pruned


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_flops_match_the_hand_count(attn):
    model = tiny_model("bert", attn)  # 2 layers, hidden 32, 4 heads of 8, FFN 37, 3 labels
    B, T, H, I = 2, 5, 32, 37
    attention_per_layer = 2 * B * T * H * 96 + 2 * 2 * B * 4 * T * T * 8 + 2 * B * T * 32 * H
    ffn_per_layer = 2 * B * T * H * I * 2
    pooler_and_classifier = 2 * B * H * H + 2 * B * H * 3  # on the first token only
    assert counted_flops(model, B, T) == {"total": 2 * (attention_per_layer + ffn_per_layer) + pooler_and_classifier,
                                          "attention": 2 * attention_per_layer}
    remove_heads(model, [("encoder", 1, 0)])  # layer 0: no heads; layer 1: one head
    one_head = 2 * B * T * H * 24 + 2 * 2 * B * 1 * T * T * 8 + 2 * B * T * 8 * H
    assert counted_flops(model, B, T) == {"total": one_head + 2 * ffn_per_layer + pooler_and_classifier,
                                          "attention": one_head}


def test_swin_attends_within_windows_and_its_flops_say_so():
    """Not every token with every other: the tiny Swin's 8 x 8 patches of width 16 (2 heads of 8) attend
    in 16 windows of 2 x 2, then, merged to 4 x 4 of width 32 (4 heads of 8), in 4 windows."""
    from test_image_classification import tiny_swin
    stage0 = 2 * 64 * 16 * 48 + 16 * 2 * 2 * 2 * (4 * 4 * 8) + 2 * 64 * 16 * 16  # q, k, v; QK^T and AV a window; out
    stage1 = 2 * 16 * 32 * 96 + 4 * 4 * 2 * 2 * (4 * 4 * 8) + 2 * 16 * 32 * 32
    counted = counted_flops(tiny_swin(), 1, 0)
    assert counted["attention"] == 2 * stage0 + 2 * stage1 < counted["total"]


def test_debertas_relative_positions_count_as_attention():
    """Its position projections and the content-to-position products are its heads' work too: the tiny
    DeBERTa-v2's 16 relative positions (8 buckets each way) projected to keys and queries once a batch
    (32 x 32 each), and per head c2p and p2c products of T x 16 x 8."""
    model = tiny_model("deberta-v2")
    B, T, H = 2, 6, 32
    plain = 2 * B * T * H * 96 + 2 * 2 * B * 4 * T * T * 8 + 2 * B * T * 32 * H  # a layer, as BERT's
    positions = 2 * 2 * 16 * H * H + 2 * 2 * B * 4 * T * 16 * 8
    assert counted_flops(model, B, T)["attention"] == 2 * (plain + positions)


def test_measure_command_compares_side_by_side(tmp_path, capsys, caplog):
    model = tiny_model("bert", layers=3)
    save_pruned(model, tmp_path / "pruned", [("encoder", 2, 1)])
    assert main(["measure", "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "1", "4", "--lengths", "16",
                 "--repeats", "3", "--output-dir", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    # each setting said as it is measured, with how many there are, in the log (with its time)
    said = [r.getMessage()[:22] for r in caplog.records if r.name == "headprune.measure"]
    assert said == ["[1/2] batch   1 length", "[2/2] batch   4 length"]
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


@pytest.mark.parametrize("arch", ["deberta-v2", "deberta", "modernbert", "t5"])
def test_measure_on_the_newer_encoders(arch, tmp_path):
    """T5's classifier reads an end token in every input, and generates nothing: it is timed on one
    forward pass."""
    from headprune.config import MeasureConfig
    from headprune.measuring import measure
    save_pruned(tiny_model(arch, layers=3), tmp_path, [("encoder", 0, 1), ("encoder", 2, 2)])
    result = measure(MeasureConfig(pruned=str(tmp_path), batch_sizes=[2], lengths=[8], repeats=2, warmup=0,
                                   attn_implementation="eager"), progress=lambda *_: None)
    assert result["heads"] == {"original": 36 if arch == "t5" else 12, "pruned": 2}  # T5: 3 kinds of 12
    row = result["settings"][0]
    assert row["attention_flops"]["pruned"] < row["attention_flops"]["original"] and row["speedup"] > 0
    assert result["generation"] == [] and "kv_cache_bytes_per_token" not in result


def test_a_prompt_and_what_is_generated_from_it_must_fit_the_positions(tmp_path, capsys):
    from conftest import write_tiny_lm
    model, _ = write_tiny_lm(tmp_path / "lm")  # 256 positions
    line = one_line_error(capsys, ["measure", "--pruned", model, "--lengths", "240", "--generate-tokens", "32"])
    assert "--lengths 240 and --generate-tokens 32: longer than the model's 256 positions" in line


def test_a_count_that_runs_out_of_memory_leaves_the_attention_flops_out(monkeypatch, caplog):
    import torch

    import headprune.measuring as measuring

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(measuring, "counted_flops", out_of_memory)
    facts = measuring.size_facts(tiny_model("bert"), "group", 16)
    assert facts == {"parameters": sum(p.numel() for p in tiny_model("bert").parameters())}
    assert "not counted (out of memory)" in caplog.text


def test_a_generators_progress_counts_its_generation_settings(tmp_path, caplog):
    folder, _ = write_tiny_lm(tmp_path / "lm", layers=2)
    save_pruned(load_pruned(folder), tmp_path / "pruned", [("decoder", 0, 0), ("decoder", 1, 1)])
    with caplog.at_level(logging.INFO, logger="headprune"):
        assert main(["measure", "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "1", "--lengths", "8",
                     "--beams", "1", "2", "--generate-tokens", "2", "--repeats", "1", "--warmup", "0",
                     "--output-dir", str(tmp_path / "m")]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "headprune.measure"]
    assert [line.split("]")[0] + "]" for line in said] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "generate batch" in said[1] and "beam 2" in said[2]


def timing(spread):
    return {"q1": 1.0, "median": 1.0 + spread / 2, "q3": 1.0 + spread}


def test_a_spread_above_a_tenth_of_the_median_is_called_noisy():
    quiet, noisy = 0.9 * NOISY, 1.2 * NOISY  # IQR as a fraction of about the median
    assert _note("cpu", 8, 2.0, {"original": timing(quiet), "pruned": timing(quiet)}) == ""
    note = _note("cpu", 8, 2.0, {"original": timing(quiet), "pruned": timing(noisy)})
    assert note.startswith("noisy machine: interquartile range pruned ") and "original" not in note
    assert _note("cpu", 8, 1.01, {"original": timing(0), "pruned": timing(0)}).startswith("almost nothing removed")
    assert _note("cuda", 1, 2.0, {"original": timing(0), "pruned": timing(0)}).startswith("batch 1 on a GPU")
    assert _note("cuda", 2, 2.0, {"original": timing(0), "pruned": timing(0)}) == ""


def test_a_measurement_stopped_midway_measures_only_the_settings_left(tmp_path, monkeypatch, caplog):
    """Each setting's row is kept as it is measured: the same command again after a kill times the
    settings left, and its table equals one measured at once; the kept rows go once it is whole."""
    import headprune.measuring as measuring
    from headprune.config import MeasureConfig
    folder, _ = write_tiny_lm(tmp_path / "lm", layers=2)
    save_pruned(load_pruned(folder), tmp_path / "pruned", [("decoder", 0, 0), ("decoder", 1, 1)])
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path / "cache"))
    timed = []

    class Killed(Exception):
        pass

    def fake_alternate(models, run, repeats, warmup, device):  # no clock: 10 ms plus 1 ms a kept group
        if kill and len(timed) == 3:
            raise Killed
        timed.append(1)
        return {name: {"q1": 0.01, "median": 0.010 + 0.001 * sum(s.num_heads for s in measuring.find_sites(m)),
                       "q3": 0.01} for name, m in models.items()}
    monkeypatch.setattr(measuring, "alternate", fake_alternate)
    cfg = MeasureConfig(pruned=str(tmp_path / "pruned"), batch_sizes=[1, 2], lengths=[8], beams=[1],
                        generate_tokens=2, repeats=1, warmup=0)
    kill = True
    with pytest.raises(Killed):  # after 3 of the 4 settings: batch 1 and its generation, batch 2
        measuring.measure(cfg, progress=lambda line: None)
    kill, timed[:] = False, []
    lines = []
    resumed = measuring.measure(cfg, progress=lines.append)
    assert timed == [1] and lines[0].startswith("3 of 4 settings measured before, by a measurement stopped midway")
    assert [line.split("]")[0] + "]" for line in lines[1:]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert not any((tmp_path / "cache" / "measure").iterdir())  # whole: nothing kept
    whole = measuring.measure(cfg, progress=lambda line: None)
    assert timed == [1, 1, 1, 1, 1] and whole == resumed
