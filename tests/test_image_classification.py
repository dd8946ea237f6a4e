"""Image classification (issue 23): Vision Transformers on the offline digits or an image folder.
The data in every layout and its one-line errors; ViT's and Swin's heads: gates at 1 change
nothing, removal (with a layer left without heads; Swin: its shifted windows and its relative
position bias table per block) equals the mask, save and load give the same logits; a small ViT
trained from scratch and pruned by each family of method."""
import copy

import pytest
import torch
from PIL import Image
from transformers import (BeitConfig, BeitForImageClassification, DeiTConfig, DeiTForImageClassification, SwinConfig, SwinForImageClassification, Swinv2Config,
                          Swinv2ForImageClassification, ViTConfig, ViTForImageClassification)

from headprune import attach_gates, detach_gates
from headprune.config import FinetuneConfig, PruneConfig
from headprune.errors import DataError, ModelError, UnsupportedArchitectureError
from headprune.images import load_images
from headprune.pruning import load_pruned, remove_heads, save_pruned
from headprune.recipes import finetune, prune
from headprune.sites import find_sites


def test_the_offline_digits_in_fixed_splits():
    data = load_images("offline:digits")
    assert (len(data.train), len(data.evals["validation"]), len(data.evals["test"])) == (1197, 300, 300)
    assert data.label_names == [str(d) for d in range(10)]
    image = data.train[0]["image"]
    assert image.size == (8, 8) and image.mode == "L" and 0 <= data.train[0]["label"] < 10
    assert load_images("offline:digits").evals["test"]["label"] == data.evals["test"]["label"]  # the same order


def write_folder(root, layout):
    for split, counts in layout.items():
        for label, n in counts.items():
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (6, 6), (40 * i, 0, 255 if label == "b" else 0)).save(folder / f"{i}.png")
    return root


def test_image_folders_with_splits_or_a_held_out_tenth(tmp_path):
    data = load_images(str(write_folder(tmp_path / "a", {"train": {"a": 4, "b": 3}, "validation": {"b": 2}})))
    assert data.label_names == ["a", "b"] and len(data.train) == 7 and data.evals["validation"]["label"] == [1, 1]
    data = load_images(str(write_folder(tmp_path / "b", {"": {"x": 10, "y": 10}})))
    assert list(data.evals) == ["heldout"] and len(data.evals["heldout"]) == 2 and len(data.train) == 18


def test_bad_image_data_is_refused_in_one_line(tmp_path):
    with pytest.raises(DataError, match="no label folders"):
        load_images(str((tmp_path / "empty").resolve()) if (tmp_path / "empty").mkdir() is None else "")
    with pytest.raises(DataError, match=r"labels \['c'\] are not among the training labels"):
        load_images(str(write_folder(tmp_path / "c", {"train": {"a": 2}, "test": {"c": 1}})))
    root = write_folder(tmp_path / "d", {"": {"a": 2}})
    (root / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        load_images(str(root))
    with pytest.raises(DataError, match="cannot tell what image set"):
        load_images(str(tmp_path / "missing"))
    root = write_folder(tmp_path / "e", {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    (root / "train" / "c").mkdir()  # a label with nothing to learn it from
    with pytest.raises(DataError, match=r"train/c: a label folder without images"):
        load_images(str(root))


def test_images_outside_the_label_folders_are_said_to_be_left_out(tmp_path, caplog):
    root = write_folder(tmp_path / "f", {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
    Image.new("RGB", (6, 6)).save(root / "train" / "stray.png")
    assert len(load_images(str(root)).train) == 4
    assert "train: 1 image(s) outside the label folders (stray.png) belong to no label and are left out" in caplog.text


def tiny_vit(attn="eager", arch="vit"):
    torch.manual_seed(0)
    cls, config_cls = (ViTForImageClassification, ViTConfig) if arch == "vit" else \
        (DeiTForImageClassification, DeiTConfig)
    config = config_cls(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=37, num_labels=3, initializer_range=0.3)
    config._attn_implementation = attn
    return cls(config).eval()


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def gated_logits(model, kept) -> tuple[torch.Tensor, list]:
    """The logits of PIXELS with only the `kept` heads open, once gates at 1 are seen to change
    nothing, and the (kind, layer, heads) of each site."""
    with torch.no_grad():
        before = model(pixel_values=PIXELS).logits
    gates = attach_gates(model)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=PIXELS).logits, before, atol=1e-6)
        gates.set_mask(torch.tensor([float(h in kept) for h in gates.heads]))
        expected = model(pixel_values=PIXELS).logits
    sites = [(s.kind, s.layer, s.num_heads) for s in gates.sites]
    detach_gates(model)
    assert not torch.allclose(expected, before, atol=1e-3)
    return expected, sites


def pruned_and_reloaded_logits(model, kept, folder) -> tuple[torch.Tensor, torch.Tensor]:
    save_pruned(copy.deepcopy(model), folder, kept)
    with torch.no_grad():
        return remove_heads(model, kept)(pixel_values=PIXELS).logits, load_pruned(folder)(pixel_values=PIXELS).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_vit_heads_gates_removal_and_reload(arch, attn, tmp_path):
    model = tiny_vit(attn, arch)
    kept = [("encoder", 0, 1), ("encoder", 0, 2), ("encoder", 2, 3)]  # layer 1 keeps none: it skips attention
    expected, sites = gated_logits(model, kept)
    assert sites == [("encoder", 0, 4), ("encoder", 1, 4), ("encoder", 2, 4)]
    for got in pruned_and_reloaded_logits(model, kept, tmp_path):
        assert torch.allclose(got, expected, atol=1e-5)
    assert [s.num_heads for s in find_sites(load_pruned(tmp_path))] == [2, 0, 1]


def tiny_swin(attn="eager"):
    """8 x 8 patches in windows of 2 x 2, shifted in every second block; 2 blocks of 2 heads, then
    (patches merged) 2 blocks of 4 heads; a position bias table per block, made large."""
    torch.manual_seed(0)
    config = SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2,
                        num_labels=3, initializer_range=0.3)
    config._attn_implementation = attn
    model = SwinForImageClassification(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_swin_heads_gates_removal_and_reload(attn, tmp_path):
    model = tiny_swin(attn)
    kept = [("encoder", 0, 1), ("encoder", 2, 0), ("encoder", 2, 3), ("encoder", 3, 1), ("encoder", 3, 2)]
    expected, sites = gated_logits(model, kept)
    assert [(layer, heads) for _, layer, heads in sites] == [(0, 2), (1, 2), (2, 4), (3, 4)]  # blocks in order
    for got in pruned_and_reloaded_logits(model, kept, tmp_path):
        assert torch.allclose(got, expected, atol=1e-5)
    # each block's table keeps the columns of its kept heads (block 1 keeps none: it skips attention, its
    # table stays whole)
    tables = [m.relative_position_bias_table for m in model.modules() if hasattr(m, "relative_position_bias_table")]
    assert [t.shape[1] for t in tables] == [1, 2, 2, 2]
    assert torch.equal(tables[2], tiny_swin(attn).swin.encoder.layers[1].blocks[0].attention
                       .relative_position_bias.relative_position_bias_table[:, [0, 3]])
    assert [s.num_heads for s in find_sites(load_pruned(tmp_path))] == [1, 0, 2, 2]


@pytest.mark.parametrize("per_layer,shared", [(True, False), (False, True), (True, True)])
def test_beit_slices_its_position_bias_tables_and_its_shared_bias_per_layer(per_layer, shared, tmp_path):
    """A table per layer is sliced by column; the bias of the table shared by the layers reaches each
    layer whole, and each layer takes its kept heads' slice (pruned twice: by their original numbers)."""
    torch.manual_seed(0)
    common = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=37, num_labels=3, initializer_range=0.3)
    model = BeitForImageClassification(BeitConfig(**common, use_relative_position_bias=per_layer,
                                                  use_shared_relative_position_bias=shared)).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0.0, 2.0)
    kept = [("encoder", 0, 1), ("encoder", 0, 2), ("encoder", 2, 3)]
    expected, _ = gated_logits(model, kept)
    for got in pruned_and_reloaded_logits(model, kept, tmp_path):
        assert torch.allclose(got, expected, atol=1e-5)
    if per_layer:
        assert [layer.relative_position_bias.relative_position_bias_table.shape[1]
                for layer in model.beit.layers] == [2, 4, 1]  # layer 1 keeps no heads: its table stays whole
    if shared:
        assert model.beit.shared_position_bias.relative_position_bias_table.shape[1] == 4  # every head's, kept
    # pruned twice: layer 0 keeps its second head (originally head 2); the shared bias's slice follows
    again, _ = gated_logits(model, [("encoder", 0, 1), ("encoder", 2, 0)])
    remove_heads(model, [("encoder", 0, 1), ("encoder", 2, 0)])
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=PIXELS).logits, again, atol=1e-5)


def test_swin_v2_is_refused_in_one_line():
    """Its blocks' names match BERT's attention modules, but not its layer numbering, and it keeps
    more per-head tables (a logit scale, a position MLP): no layout claims it."""
    model = Swinv2ForImageClassification(Swinv2Config(image_size=16, patch_size=4, embed_dim=8, depths=[2, 2],
                                                      num_heads=[2, 4], window_size=2, num_labels=3))
    with pytest.raises(UnsupportedArchitectureError, match=r"^headprune does not support 'swinv2': its attention "
                       r"module swinv2\.encoder\.layers\.0\.blocks\.0\.attention \(Swinv2Attention\) matches none"):
        attach_gates(model)


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit")
    results = finetune(FinetuneConfig(task="image-classification", model="scratch:vit-tiny", dataset="offline:digits",
                                      max_train_examples=600, max_eval_examples=150, epochs=4, batch_size=32, lr=2e-3,
                                      output_dir=str(out), checkpoint_every=0))
    return out / "model", results


def test_a_vit_from_scratch_learns_the_digits(trained_vit):
    model_dir, results = trained_vit
    assert results["task"] == "image-classification" and list(results["metrics"]) == ["validation", "test"]
    assert results["metrics"]["validation"] > 0.3  # 10 labels: chance is 0.1 (measured: 0.44 after 4 epochs)
    assert (model_dir / "preprocessor_config.json").is_file()  # the image processor travels with it


@pytest.mark.parametrize("method,reconstruct", [("dsp", "none"), ("michel", "none"), ("fisher", "rescale"),
                                                ("flap", "bias"), ("taylor", "none"), ("activation", "both")])
def test_a_vit_pruned_by_each_family_reloads(trained_vit, tmp_path, method, reconstruct):
    model_dir, _ = trained_vit
    results = prune(PruneConfig(task="image-classification", model=str(model_dir), dataset="offline:digits",
                                max_train_examples=200, max_eval_examples=100, k=5, batch_size=32, method=method,
                                reconstruct=reconstruct, output_dir=str(tmp_path), checkpoint_every=0))
    assert results["k"] == 5 and results["num_heads"] == 16 and results["labels"] == [str(d) for d in range(10)]
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "model"))) == 5


def test_an_unknown_model_from_scratch_is_refused(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'scratch:vit-huge'; from scratch: scratch:vit-tiny"):
        prune(PruneConfig(task="image-classification", model="scratch:vit-huge", dataset="offline:digits", k=2,
                          mode="joint", output_dir=str(tmp_path)))
    with pytest.raises(ModelError, match="'scratch:vit-tiny' is a new, untrained model: pipelined pruning starts"):
        prune(PruneConfig(task="image-classification", model="scratch:vit-tiny", dataset="offline:digits", k=2,
                          output_dir=str(tmp_path / "p")))


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_measure_times_a_pruned_vit_on_its_patches(arch, tmp_path):
    import json
    from headprune.cli import main
    save_pruned(tiny_vit(arch=arch), tmp_path / "p", [("encoder", 0, 1), ("encoder", 0, 2), ("encoder", 2, 3)])
    assert main(["measure", "--pruned", str(tmp_path / "p"), "--batch-sizes", "2", "--repeats", "2", "--warmup", "0",
                 "--output-dir", str(tmp_path / "m")]) == 0
    result = json.loads((tmp_path / "m" / "measure.json").read_text())
    assert result["heads"] == {"original": 12, "pruned": 3}
    # 16 patches of 4 x 4 pixels and the class token (DeiT: and a distillation token); no --lengths
    assert [(r["batch"], r["length"]) for r in result["settings"]] == [(2, 17 if arch == "vit" else 18)]
    assert result["settings"][0]["predicted_speedup"] > 1 and "generation" in result and not result["generation"]


def test_joint_pruning_trains_a_vit_from_scratch_with_its_heads(tmp_path):
    results = prune(PruneConfig(task="image-classification", model="scratch:vit-tiny", dataset="offline:digits",
                                mode="joint", max_train_examples=200, max_eval_examples=100, k=6, epochs=2,
                                batch_size=32, lr=2e-3, output_dir=str(tmp_path), checkpoint_every=0))
    assert results["mode"] == "joint" and results["k"] == 6
    assert sum(s.num_heads for s in find_sites(load_pruned(tmp_path / "model"))) == 6


def test_a_datasets_image_set_by_name(tmp_path):
    # hf:<name> goes through datasets.load_dataset; a local image folder stands in for a hub set
    root = write_folder(tmp_path / "set", {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    data = load_images(f"hf:{root}")
    assert data.label_names == ["cat", "dog"] and len(data.train) == 5 and list(data.evals) == ["test"]
    with pytest.raises(DataError, match="cannot load the image set"):
        load_images(f"hf:{tmp_path / 'nothing-here'}")


def test_a_model_without_its_classifier_is_named_as_such_for_pipelined_pruning(tmp_path):
    """The one-line reason, not wrapped as a failure to load the weights (they loaded)."""
    from safetensors.torch import load_file, save_file
    from transformers import ViTImageProcessor
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, num_labels=10)
    ViTForImageClassification(config).save_pretrained(tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"  # the classifier's weights lost
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("classifier")}, weights,
              metadata={"format": "pt"})
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "base")
    with pytest.raises(ModelError) as refused:
        prune(PruneConfig(task="image-classification", model=str(tmp_path / "base"), dataset="offline:digits", k=2,
                          output_dir=str(tmp_path / "out")))
    assert str(refused.value).startswith(f"'{tmp_path / 'base'}' is not a fine-tuned image classifier (it lacks")
