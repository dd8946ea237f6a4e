import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, DistilBertConfig,
                          ElectraConfig, RobertaConfig)

ARCHS = ["bert", "roberta", "electra", "distilbert"]


def tiny_config(arch: str, attn: str = "eager", num_labels: int = 3):
    # A wide init so that outputs depend visibly on every head (the default 0.02 gives ~0 logits).
    common = dict(vocab_size=99, num_labels=num_labels, max_position_embeddings=64, initializer_range=0.3)
    if arch == "distilbert":
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **common)
    else:
        cls = {"bert": BertConfig, "roberta": RobertaConfig, "electra": ElectraConfig}[arch]
        cfg = cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  **common)
    cfg._attn_implementation = attn
    return cfg


def tiny_model(arch: str = "bert", attn: str = "eager", seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(arch, attn, num_labels)).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding exercises the attention mask path
    return {"input_ids": ids, "attention_mask": mask}
