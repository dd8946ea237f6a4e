"""Gates at 1 leave the model unchanged; a gate at 0 equals removing that head by hand."""
import copy

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from headprune import attach_gates, detach_gates
from headprune.sites import UnsupportedArchitectureError, find_sites
from headprune.methods.dsp import DSPSelector


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping `keep` rows (dim=0) or input columns (dim=1), written out by hand."""
    weight = linear.weight.detach().index_select(dim, keep)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[keep])
    return new


def remove_head_by_hand(model, layer: int, head: int):
    """Drop one head's rows of q, k, v and its columns of the output projection."""
    site = [s for s in find_sites(model) if s.layer == layer][0]
    d = site.head_dim
    keep = torch.tensor([i for i in range(site.query.out_features) if not head * d <= i < (head + 1) * d])
    owner = site.attention
    names = ("q_lin", "k_lin", "v_lin") if hasattr(owner, "q_lin") else ("query", "key", "value")
    for name in names:
        setattr(owner, name, _slice_linear(getattr(owner, name), keep, 0))
    if hasattr(owner, "out_lin"):
        owner.out_lin = _slice_linear(owner.out_lin, keep, 1)
    else:  # BERT family: the output projection sits in the parent attention module
        parent = dict(model.named_modules())[
            [n for n, m in model.named_modules() if getattr(m, "self", None) is owner][0]]
        parent.output.dense = _slice_linear(parent.output.dense, keep, 1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_gives_unchanged_outputs(arch, attn, batch):
    model = tiny_model(arch, attn)
    before = logits(model, batch)
    gates = attach_gates(model)
    assert gates.num_heads == 8
    assert torch.allclose(logits(model, batch), before, atol=1e-6, rtol=0)
    detach_gates(model)
    assert torch.equal(logits(model, batch), before)
    assert not hasattr(model, "head_gates")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gate_at_zero_equals_head_removed_by_hand(arch, attn, batch):
    model = tiny_model(arch, attn)
    by_hand = copy.deepcopy(model)
    remove_head_by_hand(by_hand, layer=1, head=2)
    expected = logits(by_hand, batch)

    gates = attach_gates(model)
    mask = torch.ones(gates.num_heads)
    mask[gates.heads.index(("encoder", 1, 2))] = 0.0
    gates.set_mask(mask)
    got = logits(model, batch)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    # and the gate really did something
    gates.set_mask(torch.ones(gates.num_heads))
    assert (logits(model, batch) - expected).abs().max() > 1e-3


def test_gate_scales_the_head_linearly(batch):
    """Half a gate on every head of the last layer is the mean of gates 0 and 1 at that layer's
    attention output (the output projection is affine in its input)."""
    model = tiny_model("bert")
    gates = attach_gates(model)
    site = gates.sites[-1]
    seen = []
    hook = site.output.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    for value in (0.0, 1.0, 0.5):
        mask = torch.ones(gates.num_heads)
        mask[4:] = value
        gates.set_mask(mask)
        logits(model, batch)
    hook.remove()
    assert torch.allclose(seen[2], (seen[0] + seen[1]) / 2, atol=1e-6)


def test_heads_are_addressed_by_kind_layer_head():
    gates = attach_gates(tiny_model("bert"))
    assert gates.heads[:5] == [("encoder", 0, 0), ("encoder", 0, 1), ("encoder", 0, 2),
                               ("encoder", 0, 3), ("encoder", 1, 0)]


def test_unsupported_architecture_names_the_supported_layouts():
    from transformers import BloomConfig, BloomForSequenceClassification, MPNetConfig, MPNetForSequenceClassification
    bloom = BloomForSequenceClassification(BloomConfig(n_layer=1, n_head=2, hidden_size=8, vocab_size=20))
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom': its attention module transformer\.h\.0\."
                       r"self_attention \(BloomAttention\) matches none of the layouts it knows.*head size.*: BERT-style.*DistilBERT-style"):
        attach_gates(bloom)
    mpnet = MPNetForSequenceClassification(MPNetConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=8, vocab_size=20))
    with pytest.raises(UnsupportedArchitectureError, match="'mpnet'"):
        attach_gates(mpnet)


@pytest.mark.parametrize("model_type,settings,norm", [
    ("olmo2", {}, r"q_norm has weights of shape \(32,\) for heads of size 8 \(a norm over all heads together"),
    ("olmoe", {}, r"q_norm has weights of shape \(32,\) for heads of size 8 \(a norm over all heads together"),
])
def test_query_or_key_norms_that_couple_the_heads_are_refused(model_type, settings, norm):
    """OLMo 2 and OLMoE normalise the queries of all heads together: removing a head would change the
    others (Qwen3's and Gemma 3's norm, shared by all heads, and Cohere's, one per head, are pruned in
    test_llm_heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=16, vocab_size=20, **settings)
    with pytest.raises(UnsupportedArchitectureError, match=f"^headprune does not support '{model_type}': its "
                       f"attention's {norm}"):
        attach_gates(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("model_type,module", [
    ("nystromformer", r"encoder\.layer\.0\.attention \(NystromformerAttention\)"),  # a convolution per head
    ("convbert", r"encoder\.layer\.0\.attention \(ConvBertAttention\)"),  # span convolutions
    ("diffllama", r"layers\.0\.self_attn \(DiffLlamaAttention\)"),  # heads in pairs, lambdas, a norm over them
])
def test_lookalikes_of_supported_layouts_are_refused_in_one_line(model_type, module):
    """Their modules are named as BERT's or Llama's, but they hold more per head (removal crashed)."""
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=16, vocab_size=20, n_embd=32, n_layer=1, n_head=4,
                                  num_key_value_heads=2, head_dim=8)
    with pytest.raises(UnsupportedArchitectureError, match=f"^headprune does not support '{model_type}': its "
                       f"attention module {module} matches none of the layouts"):
        attach_gates(AutoModel.from_config(config))


def test_led_is_refused_although_its_decoder_matches_barts_layout():
    """Without the refusal its encoder heads would stay whole and its pruned decoder would fail after the run."""
    from transformers import LEDConfig, LEDForConditionalGeneration
    model = LEDForConditionalGeneration(LEDConfig(vocab_size=20, d_model=16, encoder_layers=1, decoder_layers=1,
                                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=8,
                                                  decoder_ffn_dim=8, attention_window=4))
    with pytest.raises(UnsupportedArchitectureError, match="^headprune does not support 'led' yet: its encoder's "
                       "Longformer attention matches no layout"):
        attach_gates(model)


def test_two_sites_at_one_layer_are_refused():
    from headprune.sites import AttentionSite, check_sites
    linear = nn.Linear(4, 4)
    site = AttentionSite("encoder", 3, nn.Module(), linear, linear, linear, linear, 2)
    check_sites("x", [site])
    with pytest.raises(UnsupportedArchitectureError, match="^headprune does not support 'x': two of its attention "
                       "modules are both encoder layer 3 in the layout it matches$"):
        check_sites("x", [site, AttentionSite("encoder", 3, nn.Module(), linear, linear, linear, linear, 2)])


def test_attention_no_layout_reads_is_named_in_a_warning(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=20, add_cross_attention=True))
    with caplog.at_level("WARNING", logger="headprune"):
        gates = attach_gates(model)
    assert [(kind, layer) for kind, layer, _ in gates.heads[::2]] == [("decoder", 0), ("decoder", 1)]
    assert ("no layout reads the heads of transformer.h.0.crossattention (GPT2Attention), "
            "transformer.h.1.crossattention (GPT2Attention): they are kept whole") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="headprune"):
        attach_gates(tiny_model("bert"))  # every attention module of a supported layout is read
    assert caplog.text == ""


@pytest.mark.parametrize("name", ["CamembertConfig", "ErnieConfig"])
def test_a_bert_layout_under_another_name_is_recognised(name, batch):
    """Recognised by its modules, not its model_type: gate 0 on a head equals zeroing its weights."""
    import transformers
    config = getattr(transformers, name)(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=37, max_position_embeddings=64, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    gates = attach_gates(model)
    assert gates.num_heads == 8
    gates.set_mask(torch.tensor([1.0, 0, 1, 1, 1, 1, 1, 1]))
    with torch.no_grad():
        gated = model(**batch).logits
        detach_gates(model)
        model.base_model.encoder.layer[0].attention.output.dense.weight[:, 8:16] = 0
        assert torch.allclose(model(**batch).logits, gated, atol=1e-6)


def test_attaching_twice_is_refused():
    model = tiny_model("bert")
    attach_gates(model)
    with pytest.raises(RuntimeError, match="already has head gates"):
        attach_gates(model)


@pytest.mark.parametrize("training", [True, False])
def test_asking_for_the_kept_heads_leaves_the_selector_in_its_mode(training):
    """kept_heads() reads the selector's evaluation mask; a training run that logs or checkpoints
    it must go on sampling (a selector left in eval would train on the hard top-k)."""
    gates = attach_gates(tiny_model("bert"))
    gates.selector = DSPSelector(gates.num_heads, k=3, seed=0)
    gates.selector.train(training)
    kept = gates.kept_heads()
    assert len(kept) == 3
    assert gates.selector.training is training
