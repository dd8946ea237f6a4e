"""`headprune export --format transformers`: a model with the same heads in every layer as a plain
transformers folder that `from_pretrained` loads without headprune and that computes what the
pruned model computes (with FLAP's output bias too); what a plain config cannot hold is refused in
one line and nothing is written."""
import json

import pytest
import torch
from conftest import one_line_error, tiny_model, word_tokenizer
from test_llm_heads import outputs, prompt, same, tiny_llm  # noqa: F401 (prompt: a fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from headprune.cli import main
from headprune.errors import ConfigError
from headprune.pruning import add_output_biases, load_pruned, save_pruned
from headprune.sites import find_sites


def export(pruned, output, *extra):
    return main(["export", "--format", "transformers", "--model", str(pruned), "--output", str(output), *extra])


@pytest.mark.parametrize("unit,kept,counts", [
    ("group", [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 2, 1)], (3, 1)),  # a KV group a layer
    ("query", [("decoder", 0, 0), ("decoder", 0, 2), ("decoder", 1, 1), ("decoder", 1, 2), ("decoder", 2, 0),
               ("decoder", 2, 1)], (4, 2)),  # 2 query positions of each group a layer
])
def test_a_uniformly_pruned_llama_loads_with_plain_from_pretrained(unit, kept, counts, prompt, tmp_path):  # noqa: F811
    model = tiny_llm()  # 3 layers x 6 query heads in 2 groups
    save_pruned(model, tmp_path / "pruned", kept, unit=unit)
    expected = outputs(load_pruned(tmp_path / "pruned"), prompt)
    assert export(tmp_path / "pruned", tmp_path / "plain") == 0
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (*counts, 8)
    assert "headprune" not in config and config["headprune_source"]["unit"] == unit
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    same(outputs(plain, prompt), expected)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())


def test_measure_takes_a_plain_export_beside_its_original_only(capsys, tmp_path):
    from headprune.config import MeasureConfig
    from headprune.measuring import measure
    tiny_llm().save_pretrained(tmp_path / "original")
    model = tiny_llm()
    save_pruned(model, tmp_path / "pruned", [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 2, 1)])
    assert export(tmp_path / "pruned", tmp_path / "plain") == 0
    settings = dict(pruned=str(tmp_path / "plain"), batch_sizes=[2], lengths=[8], repeats=1, warmup=0)
    result = measure(MeasureConfig(**settings, original=str(tmp_path / "original")), progress=lambda *_: None)
    assert result["kv_cache_bytes_per_token"] == {"original": 3 * 2 * 64, "pruned": 3 * 1 * 64}
    with pytest.raises(ConfigError, match="is a plain export .* give --original"):
        measure(MeasureConfig(**settings), progress=lambda *_: None)


def test_flaps_output_bias_is_kept_by_the_configs_attention_bias(prompt, tmp_path):  # noqa: F811
    model = tiny_llm()
    kept = [("decoder", layer, 0) for layer in range(3)]
    sites = find_sites(model)
    add_output_biases(sites)
    with torch.no_grad():
        for site in sites:
            site.output.bias.normal_(0.0, 0.5)
    save_pruned(model, tmp_path / "pruned", kept, output_biases=True)
    expected = outputs(load_pruned(tmp_path / "pruned"), prompt)
    assert export(tmp_path / "pruned", tmp_path / "plain") == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert plain.config.attention_bias is True
    attention = plain.model.layers[1].self_attn
    assert not attention.q_proj.bias.any() and not attention.k_proj.bias.any() and attention.o_proj.bias.any()
    same(outputs(plain, prompt), expected)


def test_what_a_plain_config_cannot_hold_is_refused_in_one_line(capsys, tmp_path):
    uneven = tiny_llm()  # layer 0 keeps both groups, layer 1 one, layer 2 one
    save_pruned(uneven, tmp_path / "uneven",
                [("decoder", 0, 0), ("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 2, 1)])
    assert "this model's layers keep 6/2, 3/1, 3/1 query/key-value heads: prune with --allocation uniform" in \
        one_line_error(capsys, ["export", "--format", "transformers", "--model", tmp_path / "uneven",
                                "--output", tmp_path / "out"])
    bert = tiny_model("bert")  # 2 layers x 4 heads; BERT derives the head size from the width
    save_pruned(bert, tmp_path / "bert", [("encoder", 0, 1), ("encoder", 0, 3), ("encoder", 1, 0), ("encoder", 1, 2)])
    message = one_line_error(capsys, ["export", "--format", "transformers", "--model", tmp_path / "bert",
                                      "--output", tmp_path / "out"])
    assert "a plain BertForSequenceClassification with 2 heads a layer has other shapes than this model" in message
    assert not (tmp_path / "out").exists()
    AutoModelForSequenceClassification.from_config(bert.config)  # (the unpruned config still builds)
    unpruned = tiny_llm()
    unpruned.save_pretrained(tmp_path / "unpruned")
    assert "is not a physically pruned model" in one_line_error(
        capsys, ["export", "--format", "transformers", "--model", tmp_path / "unpruned", "--output", tmp_path / "out"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert "holds files: give --overwrite" in one_line_error(
        capsys, ["export", "--format", "transformers", "--model", tmp_path / "uneven", "--output", tmp_path / "taken"])
    assert "overlaps the model" in one_line_error(
        capsys, ["export", "--format", "transformers", "--model", tmp_path / "uneven", "--output",
                 tmp_path / "uneven" / "plain"])
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("")
    assert "cannot write to the output folder" in one_line_error(
        capsys, ["export", "--format", "transformers", "--model", tmp_path / "uneven", "--output",
                 tmp_path / "a-file" / "plain"])


def test_a_bf16_model_is_written_in_bf16(tmp_path):
    model = tiny_llm().to(torch.bfloat16)
    save_pruned(model, tmp_path / "pruned", [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 2, 1)])
    assert export(tmp_path / "pruned", tmp_path / "plain") == 0
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["dtype"] == "bfloat16"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    pruned = load_pruned(tmp_path / "pruned")
    assert plain.dtype == pruned.dtype == torch.bfloat16
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():  # the same weights and shapes: the same bf16 arithmetic
        assert torch.equal(plain(input_ids=ids).logits, pruned(input_ids=ids).logits)


def test_the_plain_folder_holds_the_pruned_models_tokenizer(tmp_path):
    """A plain folder is for runtimes that load it alone (vLLM, TGI): it needs the tokenizer beside the weights."""
    kept = [("decoder", 0, 1), ("decoder", 1, 0), ("decoder", 2, 1)]
    save_pruned(tiny_llm(), tmp_path / "pruned", kept, word_tokenizer(), unit="group")
    assert main(["export", "--format", "transformers", "--model", str(tmp_path / "pruned"),
                 "--output", str(tmp_path / "plain")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert tokenizer("w1 w2")["input_ids"] == word_tokenizer()("w1 w2")["input_ids"]


def test_the_plain_model_takes_the_pruned_models_tensors_without_copying_them(tmp_path):
    from headprune.plain import plain_model
    save_pruned(tiny_llm(), tmp_path, [("decoder", layer, 1) for layer in range(3)], unit="group")
    model = load_pruned(tmp_path)
    plain = plain_model(model)
    ours = dict(model.named_parameters())
    shared = [name for name, p in plain.named_parameters() if p.data_ptr() == ours[name].data_ptr()]
    assert shared == [name for name, _ in plain.named_parameters()]  # every weight, none random
