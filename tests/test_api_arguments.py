"""The public Python functions refuse what would give a wrong model without a word: kept heads the
model does not have, a head twice or none, gates still attached when heads are removed, a mask of
the wrong length; and a pruned model saved again with transformers' own `save_pretrained` loads."""
import pytest
import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, TrainerState, TrainingArguments, ViTConfig,
                          ViTForImageClassification)

from conftest import tiny_model
from headprune import attach_gates, detach_gates, load_pruned, remove_heads, save_pruned
from headprune.errors import ConfigError, OutputExistsError, PrunedCheckpointError
from headprune.integrations import HeadPruningCallback
from headprune.sites import find_sites


def heads_per_layer(model):
    return [site.num_heads for site in find_sites(model)]


@pytest.mark.parametrize("kept,why", [
    ([("Encoder", 0, 1)], "names Encoder head 1 of layer 0, which the model does not have"),
    ([("encoder", 0, 4)], "names encoder head 4 of layer 0"),   # 4 heads a layer: 0 to 3
    ([("encoder", 2, 0)], "names encoder head 0 of layer 2"),   # 2 layers
    ([("encoder", 0, -1)], "names encoder head -1"),
    ([(0, 1)], "malformed kept head"),
    ([("encoder", 0, 1), ("encoder", 0, 1)], "names a head more than once"),
])
def test_remove_heads_refuses_kept_heads_the_model_does_not_have(kept, why):
    model = tiny_model()
    with pytest.raises(ValueError, match=why):
        remove_heads(model, kept)
    assert heads_per_layer(model) == [4, 4]  # untouched


def test_save_pruned_refuses_them_before_writing(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="more than once"):
        save_pruned(model, tmp_path / "model", [("encoder", 0, 1), ("encoder", 0, 1)])
    assert not (tmp_path / "model").exists() and heads_per_layer(model) == [4, 4]


def test_heads_are_not_removed_under_attached_gates(tmp_path, batch):
    """The gates' masks would fall on the renumbered heads: a model unlike the masked one."""
    model = tiny_model()
    gates = attach_gates(model)
    gates.set_mask(torch.tensor([0, 1, 1, 1, 1, 1, 1, 0.0]))
    with pytest.raises(ValueError, match="detach_gates"):
        save_pruned(model, tmp_path / "model", gates.kept_heads())
    assert not (tmp_path / "model").exists() and heads_per_layer(model) == [4, 4]
    with torch.no_grad():
        masked = model(**batch).logits
    detach_gates(model)
    save_pruned(model, tmp_path / "model", gates.kept_heads())
    with torch.no_grad():
        assert torch.allclose(load_pruned(tmp_path / "model")(**batch).logits, masked, atol=1e-5)


def test_kept_heads_reads_the_selectors_hard_choice(tmp_path, batch):
    """With a selector driving the gates, `kept_heads()` names its hard top-k (the fixed mask stays
    all ones then: reading it kept every head), in whatever mode the selector is, and leaves that mode."""
    from headprune import make_selector
    model = tiny_model()
    gates = attach_gates(model)
    gates.selector = make_selector("dsp", gates.num_heads, k=3, t0=1.0, tf=0.01, cooldown_steps=10)
    with torch.no_grad():
        gates.selector.logits.copy_(torch.tensor([0.1, 5, 0.2, 0.3, 4, 0.4, 0.5, 3], dtype=torch.float64))
    gates.selector.train()
    assert gates.kept_heads() == [("encoder", 0, 1), ("encoder", 1, 0), ("encoder", 1, 3)]
    assert gates.selector.training
    model.eval()
    with torch.no_grad():
        masked = model(**batch).logits
    kept = gates.kept_heads()
    detach_gates(model)
    save_pruned(model, tmp_path / "model", kept)
    with torch.no_grad():
        assert torch.allclose(load_pruned(tmp_path / "model")(**batch).logits, masked, atol=1e-5)


def test_a_mask_gives_one_value_per_gate():
    gates = attach_gates(tiny_model())  # 8 gates
    for wrong in (torch.ones(5), torch.ones(16), torch.ones(1, 8)):
        with pytest.raises(ValueError, match=r"for 8 gates: give one value per gate"):
            gates.set_mask(wrong)
        with pytest.raises(ValueError, match=r"for 8 gates"):
            with gates.override(wrong):
                pass
    with pytest.raises(ValueError, match="no head gates to detach"):
        detach_gates(tiny_model())


def test_the_callback_checks_k_before_it_gates_the_model(tmp_path):
    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="k=20 is more than the 8 heads"):
        HeadPruningCallback(k=20).on_train_begin(args, TrainerState(max_steps=4), None, model=model)
    assert not hasattr(model, "head_gates")  # so the same model can be given a good k
    HeadPruningCallback(k=4).on_train_begin(args, TrainerState(max_steps=4), None, model=model)
    assert model.head_gates.num_heads == 8


@pytest.mark.parametrize("arch", ["vit", "gpt-neox"])
def test_a_pruned_model_saved_again_by_save_pretrained_loads(arch, tmp_path):
    """transformers saves ViT and GPT-NeoX under an older layout's weight names by default; a
    pruned model keeps its modules' names, which load_pruned reads."""
    torch.manual_seed(0)
    if arch == "vit":
        model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=37, image_size=16, patch_size=4))
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
        kind = "encoder"
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=37))
        inputs = {"input_ids": torch.randint(0, 99, (2, 7))}
        kind = "decoder"
    save_pruned(model.eval(), tmp_path / "pruned", [(kind, 0, 1), (kind, 1, 2), (kind, 1, 3)])
    loaded = load_pruned(tmp_path / "pruned")
    loaded.save_pretrained(tmp_path / "again")  # transformers' defaults
    again = load_pruned(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, loaded(**inputs).logits)
    assert heads_per_layer(again) == [1, 2]


def test_load_pruned_as_another_class_says_what_to_do(tmp_path):
    from transformers import BertModel
    save_pruned(tiny_model(), tmp_path / "model", [("encoder", 0, 1), ("encoder", 1, 2)])
    with pytest.raises(PrunedCheckpointError, match="holds a BertForSequenceClassification, whose weights BertModel "
                                                    "does not take: .*use its .base_model"):
        load_pruned(tmp_path / "model", model_class=BertModel)
    assert heads_per_layer(load_pruned(tmp_path / "model").base_model) == [1, 1]


def test_the_callback_refuses_an_occupied_folder_before_training(tmp_path):
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "model.safetensors").write_bytes(b"an earlier model")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    model = tiny_model()
    with pytest.raises(OutputExistsError, match="holds files already; pass overwrite=True"):
        HeadPruningCallback(k=4).on_train_begin(args, TrainerState(max_steps=4), None, model=model)
    assert not hasattr(model, "head_gates")
    HeadPruningCallback(k=4, overwrite=True).on_train_begin(args, TrainerState(max_steps=4), None, model=model)
