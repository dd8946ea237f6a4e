import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEADPRUNE_CACHE", tempfile.mkdtemp(prefix="headprune-cache-"))  # not ~/.cache
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, DistilBertConfig,
                          ElectraConfig, RobertaConfig, XLMRobertaConfig)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one thread each, not two apiece
    torch.set_num_threads(1)

ARCHS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]


@pytest.fixture(autouse=True)
def _subnormals_as_torch_has_them():
    """The command line flushes subnormal floats to zero for the whole process; the next test in
    this worker starts with torch's own setting again."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def _headprune_log_level_as_before():
    """The command line sets headprune's loggers to INFO for the whole process; the next test in this
    worker starts with the level it had (pytest's)."""
    import logging
    logger = logging.getLogger("headprune")
    level = logger.level
    yield
    logger.setLevel(level)


def tiny_config(arch: str, attn: str = "eager", num_labels: int = 3, layers: int = 2):
    # A wide init so that outputs depend visibly on every head (the default 0.02 gives ~0 logits).
    common = dict(vocab_size=99, num_labels=num_labels, max_position_embeddings=64, initializer_range=0.3)
    if arch == "distilbert":
        cfg = DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=37, **common)
    elif arch == "deberta-v2":  # not in ARCHS: tests of its own (test_deberta_heads.py)
        from transformers import DebertaV2Config
        cfg = DebertaV2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                              relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                              max_relative_positions=16, share_att_key=False, norm_rel_ebd="layer_norm",
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif arch == "deberta":  # v1: one projection, per head its q, k, v rows; the q and v biases apart
        from transformers import DebertaConfig
        cfg = DebertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                            relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    elif arch == "t5":  # an encoder-decoder classifier ([SEP], id 3, of the tiny tokenizer ends each input)
        from transformers import T5Config
        cfg = T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=layers, num_heads=4, relative_attention_num_buckets=8,
                       dropout_rate=0.0, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
                       initializer_factor=3.0, vocab_size=99, num_labels=num_labels)
    elif arch == "modernbert":  # not in ARCHS: its fused projection has tests of its own (test_fused_heads.py)
        from transformers import ModernBertConfig
        cfg = ModernBertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                               pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                               attention_bias=True, global_attn_every_n_layers=2, local_attention=4,
                               embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0, **common)
    else:
        cls = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig,
               "electra": ElectraConfig}[arch]
        cfg = cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
                  **common)
    cfg._attn_implementation = attn
    return cfg


def tiny_model(arch: str = "bert", attn: str = "eager", seed: int = 0, num_labels: int = 3, layers: int = 2):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(arch, attn, num_labels, layers)).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding exercises the attention mask path
    return {"input_ids": ids, "attention_mask": mask}


def write_tiny_assets(folder, arch="bert", n_rows=160, seed=0):
    """A tiny random model folder with a word-level tokenizer, and a learnable JSONL task:
    the label says whether w1 or w2 occurs."""
    import json
    import random

    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"))
    model = tiny_model(arch, num_labels=2, seed=seed)
    # the bare encoder, like a pretrained (not fine-tuned) checkpoint
    getattr(model, model.base_model_prefix).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        words = [f"w{rng.randrange(94)}" for _ in range(8)]
        rows.append({"text": " ".join(words), "label": "yes" if {"w1", "w2"} & set(words) else "no"})
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "model", folder / "data.jsonl"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_assets, tmp_path_factory):
    from headprune.config import FinetuneConfig
    from headprune.recipes import finetune
    model, data = tiny_assets
    out = tmp_path_factory.mktemp("finetuned")
    finetune(FinetuneConfig(model=str(model), dataset=str(data), epochs=2, batch_size=16,
                            output_dir=str(out), overwrite=True, checkpoint_every=0))
    return out / "model", data


LM_WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer():
    """A word-level tokenizer of w0..w39 with <pad>, <s>, </s> (end of text), <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *LM_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def write_tiny_lm(folder, layers=3, heads=6, kv_heads=2, n_train=120, n_eval=30, seed=0, arch="llama"):
    """A tiny random Llama (or `arch` gemma2, gemma3: head_dim 12, not width / heads; sliding
    windows of 4 tokens; Gemma 2's soft-capping; or gpt2, gpt_neox, phi3, gpt_bigcode: one projection
    for queries, keys and values; GPT-2 and GPT-NeoX without grouped keys and values, GPTBigCode
    multi-query) and a word-level
    tokenizer in folder/model, and a text folder (train.txt, validation.txt) whose documents
    follow a pattern (each word is mostly followed by the next one in a cycle) in folder/text."""
    import random

    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=heads * 8, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True)
    if arch.startswith("gemma"):
        common.update(head_dim=12, sliding_window=4, query_pre_attn_scalar=12,
                      layer_types=[("full_attention", "sliding_attention")[i % 2] for i in range(layers)])
    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
             "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"), "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
             "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"), "phi3": ("Phi3Config", "Phi3ForCausalLM"),
             "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM")}[arch]
    config = getattr(transformers, names[0])(**common)
    getattr(transformers, names[1])(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(seed)

    def document():
        i, words = rng.randrange(40), []
        for _ in range(12):
            words.append(LM_WORDS[i])
            i = (i + 1) % 40 if rng.random() < 0.8 else rng.randrange(40)
        return " ".join(words)
    (folder / "text").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        (folder / "text" / f"{split}.txt").write_text("\n".join(document() for _ in range(n)))
    return folder / "model", folder / "text"


def one_line_error(capsys, argv) -> str:
    """Run the command line; it must fail with exit code 2 and one line, no traceback: that line."""
    from headprune.cli import main
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("headprune: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def tiny(model, data, out, **kw):
    """A quick prune config on the tiny assets (k = 3 of 8 heads, one epoch, no checkpoints). No
    reconstruction unless asked (the default's, DSP's bias, is tested with reconstruct="default"):
    these tests compare the saved model with the original one under the mask."""
    from headprune.config import PruneConfig
    return PruneConfig(**{"model": str(model), "dataset": str(data), "output_dir": str(out), "k": 3,
                          "epochs": 1, "batch_size": 16, "checkpoint_every": 0, "reconstruct": "none", **kw})


def finetuned_tiny(arch: str, tmp_path_factory):
    """A tiny classifier of `arch` fine-tuned on the tiny assets, made once per test session:
    (model folder, data file)."""
    from headprune.config import FinetuneConfig
    from headprune.recipes import finetune
    folder = tmp_path_factory.getbasetemp() / f"finetuned-{arch}"
    if not (folder / "ft" / "model").is_dir():
        model, data = write_tiny_assets(folder / "assets", arch=arch)
        finetune(FinetuneConfig(model=str(model), dataset=str(data), epochs=2, batch_size=16,
                                output_dir=str(folder / "ft"), checkpoint_every=0))
    return folder / "ft" / "model", folder / "assets" / "data.jsonl"


def write_tokenizer_gguf(path, vocab):
    """A GGUF file holding only a tokenizer of `vocab` made-up tokens, as `--tokenizer-gguf` reads it."""
    import gguf
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["t 0"])  # llama.cpp's BPE vocabulary needs merges to load
    writer.add_bos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
