"""headprune export --format gguf (issue 22): a pruned tiny Llama written for llama.cpp's `deci`
graph holds each layer's head counts and tensors of the pruned shapes; computed the way deci.cpp
computes (a numpy transcription: llama.cpp itself is not built in CI, benchmarks/llamacpp.py runs
it), the file gives PyTorch's logits; bad input is refused in one line."""
import numpy as np
import pytest
import torch

from conftest import one_line_error, tiny_model, write_tokenizer_gguf
from headprune.cli import main
from headprune.pruning import add_output_biases, load_pruned, save_pruned
from headprune.sites import find_sites

gguf = pytest.importorskip("gguf")  # in the test extra; skipped only where someone installs less

VOCAB = 61


def export(*args):
    return main(["export", "--format", "gguf", *map(str, args)])


def tiny_llama(tied: bool, hidden: int = 48, heads: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=40, num_hidden_layers=4,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # wide weights, so that a wrong RoPE layout or head shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.4 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pruned(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pruned") / "model"
    # KV groups: layer 0 keeps group 1, layer 1 none (attention-free in deci), layer 2 both, layer 3 none
    save_pruned(tiny_llama(request.param), folder, [("decoder", 0, 1), ("decoder", 2, 0), ("decoder", 2, 1)])
    return folder


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return fields, tensors


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_pairs(x, base):
    """llama.cpp's normal RoPE: neighbouring values (2i, 2i+1) rotate together; x [tokens, heads, d]."""
    d = x.shape[-1]
    angle = np.arange(len(x))[:, None] * base ** (-np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def deci_logits(fields, t, ids):
    """Logits of one sequence, computed as src/models/deci.cpp builds its graph."""
    eps, base = fields["deci.attention.layer_norm_rms_epsilon"], fields["deci.rope.freq_base"]
    d = fields["deci.attention.key_length"]
    x = t["token_embd.weight"][ids]
    n = len(ids)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for il, (heads, kv) in enumerate(zip(fields["deci.attention.head_count"], fields["deci.attention.head_count_kv"])):
        b = f"blk.{il}."
        if heads == 0:  # attention-free: the layer input goes on to the feed-forward block
            ffn_in = x
        else:
            h = rms(x, t[b + "attn_norm.weight"], eps)
            q = rope_pairs((h @ t[b + "attn_q.weight"].T).reshape(n, heads, d), base)
            k = rope_pairs((h @ t[b + "attn_k.weight"].T).reshape(n, kv, d), base)
            v = (h @ t[b + "attn_v.weight"].T).reshape(n, kv, d)
            out = np.empty((n, heads, d), dtype=np.float64)
            for head in range(heads):
                g = head // (heads // kv)
                scores = q[:, head] @ k[:, g].T / np.sqrt(d) + causal
                p = np.exp(scores - scores.max(-1, keepdims=True))
                out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, g]
            attn = out.reshape(n, heads * d) @ t[b + "attn_output.weight"].T + t.get(b + "attn_output.bias", 0)
            ffn_in = attn + x
        h = rms(ffn_in, t[b + "ffn_norm.weight"], eps)
        gate = h @ t[b + "ffn_gate.weight"].T
        x = ((gate / (1 + np.exp(-gate))) * (h @ t[b + "ffn_up.weight"].T)) @ t[b + "ffn_down.weight"].T + ffn_in
    x = rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def test_the_gguf_file_holds_each_layers_heads_and_computes_what_pytorch_does(pruned, tmp_path):
    tokenizer = write_tokenizer_gguf(tmp_path / "unpruned.gguf", vocab=VOCAB)
    out = tmp_path / "pruned.gguf"
    assert export("--model", pruned, "--output", out, "--dtype", "f32", "--tokenizer-gguf", tokenizer) == 0
    fields, tensors = read(out)
    assert fields["general.architecture"] == "deci"
    # layer 0 keeps its group (3 query heads over 1 key/value head); layers 1 and 3 are attention-free
    assert list(fields["deci.attention.head_count"]) == [3, 0, 6, 0]
    assert list(fields["deci.attention.head_count_kv"]) == [1, 0, 2, 0]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 8
    assert tensors["blk.0.attn_q.weight"].shape == (24, 48) and tensors["blk.0.attn_k.weight"].shape == (8, 48)
    assert tensors["blk.0.attn_output.weight"].shape == (48, 24) and tensors["blk.2.attn_q.weight"].shape == (48, 48)
    assert not any(name.startswith(("blk.1.attn", "blk.3.attn")) for name in tensors)
    assert list(fields["tokenizer.ggml.tokens"])[:3] == ["t0", "t1", "t2"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1
    model = load_pruned(pruned)
    assert ("output.weight" in tensors) == (not model.config.tie_word_embeddings)
    ids = np.array([3, 17, 42, 5, 60, 9, 28])
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = deci_logits(fields, tensors, ids)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()


def test_a_quantised_file_and_a_first_layer_without_heads(tmp_path):
    folder = tmp_path / "model"
    # rows of 64 (Q8_0 packs blocks of 32); layer 0 left empty keeps its dead head
    save_pruned(tiny_llama(False, hidden=64, heads=4), folder, [("decoder", 1, 0)])
    tokenizer = write_tokenizer_gguf(tmp_path / "unpruned.gguf", vocab=VOCAB)
    out = tmp_path / "pruned.gguf"
    assert export("--model", folder, "--output", out, "--dtype", "q8_0", "--tokenizer-gguf", tokenizer) == 0
    reader = gguf.GGUFReader(out)
    assert list(reader.fields["deci.attention.head_count"].contents()) == [1, 2, 0, 0]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_up.weight"] == "Q8_0" and types["blk.1.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_output.weight"] == "F16"  # one dead head: 16 columns, not a block of 32


def test_gguf_export_refuses_bad_input_in_one_line(pruned, tmp_path, capsys):
    tokenizer = write_tokenizer_gguf(tmp_path / "unpruned.gguf", vocab=VOCAB)
    args = ["export", "--format", "gguf", "--model", pruned, "--dtype", "f32"]
    assert "needs --tokenizer-gguf" in one_line_error(capsys, [*args, "--output", tmp_path / "a.gguf"])
    wrong = write_tokenizer_gguf(tmp_path / "other.gguf", vocab=VOCAB + 1)
    assert "62 tokens, the model 61" in one_line_error(capsys, [*args, "--output", tmp_path / "a.gguf",
                                                                 "--tokenizer-gguf", wrong])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert "not a readable GGUF" in one_line_error(capsys, [*args, "--output", tmp_path / "a.gguf",
                                                             "--tokenizer-gguf", tmp_path / "junk.gguf"])
    out = tmp_path / "kept.gguf"
    out.write_bytes(b"an earlier export")
    assert "exists: give --overwrite" in one_line_error(capsys, [*args, "--output", out, "--tokenizer-gguf", tokenizer])
    assert out.read_bytes() == b"an earlier export"
    bert = tmp_path / "bert"
    save_pruned(tiny_model("bert"), bert, [("encoder", 0, 1), ("encoder", 1, 0)])
    assert "writes Llama-family decoders" in one_line_error(
        capsys, ["export", "--format", "gguf", "--model", bert, "--output", tmp_path / "b.gguf"])
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_a_headless_layer_with_a_bias_keeps_it(tmp_path):
    model = tiny_llama(False)
    sites = find_sites(model, "group")
    add_output_biases(sites)
    with torch.no_grad():
        sites[1].output.bias.copy_(0.5 * torch.randn(sites[1].output.out_features))  # layer 1: all its heads go
    folder = tmp_path / "model"
    save_pruned(model, folder, [("decoder", 0, 1), ("decoder", 2, 0), ("decoder", 2, 1)], output_biases=True)
    tokenizer = write_tokenizer_gguf(tmp_path / "unpruned.gguf", vocab=61)
    out = tmp_path / "pruned.gguf"
    assert export("--model", folder, "--output", out, "--dtype", "f32", "--tokenizer-gguf", tokenizer) == 0
    fields, tensors = read(out)
    # layer 1 keeps its dead head (and the bias), layer 3 (no bias) is attention-free
    assert list(fields["deci.attention.head_count"]) == [3, 1, 6, 0]
    assert "blk.1.attn_output.bias" in tensors and not any(n.startswith("blk.3.attn") for n in tensors)
    ids = np.array([3, 17, 42, 5, 60, 9, 28])
    with torch.no_grad():
        expected = load_pruned(folder)(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = deci_logits(fields, tensors, ids)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
