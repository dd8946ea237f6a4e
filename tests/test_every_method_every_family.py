"""Every method, pipelined, and every trained method, joint, on a tiny model of each family that
issue 23 added (ViT and Swin: built from a config and trained a little on the digits) (the files of each family test their equalities; here: that each method keeps
exactly k units and the saved model reloads with them)."""
import pytest
from conftest import finetuned_tiny, tiny, write_tiny_lm
from test_causal_lm import lm_cfg

from headprune.config import METHODS, FinetuneConfig, PruneConfig
from headprune.pruning import load_pruned
from headprune.recipes import finetune, prune
from headprune.sites import find_sites

LANGUAGE_MODELS = ["gemma2", "gemma3", "gpt2", "gpt_neox", "phi3"]
CLASSIFIERS = ["modernbert", "deberta-v2", "deberta", "t5"]
IMAGE_MODELS = ["vit", "swin"]
FAMILIES = LANGUAGE_MODELS + CLASSIFIERS + ["vit"]
# Swin: one method of each family (trained, iterative, scored) and joint DSP; its heads are
# gated and removed by the same code as ViT's, its position bias tables tested in test_image_classification
RUNS = [(family, method, "pipelined") for family in FAMILIES for method in METHODS] + \
       [(family, method, "joint") for family in FAMILIES for method in ("dsp", "ste", "voita")] + \
       [("swin", method, "pipelined") for method in ("dsp", "michel", "flap")] + [("swin", "dsp", "joint")]
IMAGES = dict(task="image-classification", dataset="offline:digits", max_train_examples=100, max_eval_examples=50,
              batch_size=32, checkpoint_every=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(family):
        if family in made:
            return made[family]
        if family in LANGUAGE_MODELS:
            made[family] = write_tiny_lm(tmp_path_factory.mktemp(family), arch=family, n_train=40, n_eval=10)
        elif family in IMAGE_MODELS:  # a ViT or a Swin from a config, trained a little on the digits
            out = tmp_path_factory.mktemp(family)
            finetune(FinetuneConfig(model=f"scratch:{family}-tiny", output_dir=str(out), epochs=1, **IMAGES))
            made[family] = (out / "model", None)
        else:
            made[family] = finetuned_tiny(family, tmp_path_factory)
        return made[family]
    return get


@pytest.mark.parametrize("family,method,mode", RUNS, ids=lambda v: str(v))
def test_each_method_keeps_k_and_the_model_reloads(models, tmp_path, family, method, mode):
    model, data = models(family)
    if family in LANGUAGE_MODELS:
        cfg = lm_cfg(model, data, tmp_path, method=method, mode=mode, michel_step=1, k=3, lr=1e-3)
    elif family in IMAGE_MODELS:
        cfg = PruneConfig(model=str(model), output_dir=str(tmp_path), method=method, mode=mode, k=3, michel_step=2,
                          **IMAGES)
    else:
        cfg = tiny(model, data, tmp_path, method=method, mode=mode, k=3)
    results = prune(cfg)
    assert results["k"] == 3
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "model"))) == 3
