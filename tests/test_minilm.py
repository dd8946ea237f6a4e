"""The real MiniLM-L6 of the default benchmark (72 heads), with eager and SDPA attention."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from headprune import attach_gates
from headprune.pruning import zero_pruned_heads
from headprune.tasks import resolve_model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_minilm_gates(attn):
    path = resolve_model("offline:minilm-l6")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=attn).eval()
    batch = AutoTokenizer.from_pretrained(path)(["a gripping, well acted film", "dull"], padding=True,
                                                return_tensors="pt")
    with torch.no_grad():
        plain = model.bert(**batch).last_hidden_state
        gates = attach_gates(model)
        assert gates.num_heads == 72 and gates.heads[-1] == ("encoder", 5, 11)
        assert torch.allclose(model.bert(**batch).last_hidden_state, plain, atol=1e-6, rtol=0)

        mask = (torch.arange(72) % 3 != 0).float()  # prune every third head
        gates.set_mask(mask)
        masked = model.bert(**batch).last_hidden_state
        assert (masked - plain).abs().max() > 1e-2
        zero_pruned_heads(gates.sites, mask)  # the same mask written into the weights
        gates.set_mask(torch.ones(72))
        assert torch.allclose(model.bert(**batch).last_hidden_state, masked, atol=1e-5, rtol=0)
