"""Image classification (`--task image-classification`): Vision Transformers (ViT, DeiT and other
image encoders of their layout) on the offline digits, an image folder or a `datasets` image set
(headprune.images); the model's own image processor; accuracy per evaluation split.

`--model scratch:vit-tiny` builds a small ViT from a config (no pretrained image model can be had
offline here), `scratch:swin-tiny` a small Swin (shifted windows); a local folder or hub id loads
with its image processor."""

from __future__ import annotations

import logging

from transformers import (AutoImageProcessor, AutoModelForImageClassification, SwinConfig, SwinForImageClassification,
                          ViTConfig, ViTForImageClassification, ViTImageProcessorPil, default_data_collator)

from ..errors import ModelError, first_line
from ..images import ImageData, load_images
from ..data import subsample
from ..pruning import SAFE, SAFE_WEIGHTS, load_pruned
from .base import Task, loading_weights, weights_dtype
from .classification import evaluate

log = logging.getLogger("headprune")

# Models built from a config (`--model scratch:<name>`) for a 32 x 32 image: (config class, model
# class, settings). ViT: patches of 8 pixels; Swin: patches of 4, windows of 4 x 4 patches shifted
# every other block, 2 then 4 heads in its two stages (12 heads)
SCRATCH = {
    "vit-tiny": (ViTConfig, ViTForImageClassification, dict(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)),
    "swin-tiny": (SwinConfig, SwinForImageClassification, dict(
        image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4)),
}


def scratch_preset(name: str) -> tuple:
    preset = name.removeprefix("scratch:")
    if preset not in SCRATCH:
        raise ModelError(f"unknown model {name!r}; from scratch: {', '.join('scratch:' + n for n in SCRATCH)}")
    return SCRATCH[preset]


class ImageClassification(Task):
    name = "image-classification"
    metric = "accuracy"
    auto_class = AutoModelForImageClassification
    architecture_suffixes = ("ForImageClassification",)
    trained_model = "a fine-tuned image classifier"

    def model_config(self, name: str):
        if name.startswith("scratch:"):
            config_class, _, preset = scratch_preset(name)
            return None, config_class(**preset)
        return super().model_config(name)

    def load_data(self, cfg) -> ImageData:
        return subsample(load_images(cfg.dataset), cfg.max_train_examples, cfg.max_eval_examples)

    def results(self, data: ImageData) -> dict:
        return {"labels": data.label_names}

    def load_model(self, cfg, data: ImageData, path, config, require_finetuned: bool):
        labels = data.label_names
        names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
        if path is None:  # from scratch: the preset's model; its processor (PIL: no torchvision) maps pixels to [-1, 1]
            config_class, model_class, preset = scratch_preset(cfg.model)
            config = config_class(**preset, num_labels=len(labels), **names)
            config._attn_implementation = cfg.attn_implementation
            size = preset["image_size"]
            processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
            return model_class(config), processor
        try:
            processor = AutoImageProcessor.from_pretrained(path, **SAFE)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the image processor of {cfg.model!r}: {first_line(err)}") from err
        pruned = (getattr(config, "headprune", None) or {}).get("physical", False)
        if (require_finetuned or pruned) and config.num_labels != len(labels):
            raise ModelError(f"{cfg.model!r} predicts {config.num_labels} labels, the data has {len(labels)} "
                             f"({', '.join(labels)})")
        with loading_weights(repr(cfg.model)):
            if pruned:
                model = load_pruned(path, attn_implementation=cfg.attn_implementation, **weights_dtype(cfg)).train()
            else:
                model, info = AutoModelForImageClassification.from_pretrained(
                    path, num_labels=len(labels), attn_implementation=cfg.attn_implementation, output_loading_info=True,
                    ignore_mismatched_sizes=not require_finetuned, **SAFE_WEIGHTS, **weights_dtype(cfg),
                    **(names if not require_finetuned else {}))
        new = [] if pruned else sorted(info["missing_keys"])
        if require_finetuned and new:
            raise ModelError(f"{cfg.model!r} is not a fine-tuned image classifier (it lacks {new[:3]}); "
                             "pipelined pruning starts from one: run `headprune finetune` first, or use --mode joint")
        if new:
            log.warning("%s has no classification head for these %d labels: headprune adds a new one",
                        cfg.model, len(labels))
        model.config.update(names)
        return model, processor

    def prepare(self, data: ImageData, processor, cfg):
        def encode(batch):
            pixels = processor(images=[image.convert("RGB") for image in batch["image"]], return_tensors="np")
            return {"pixel_values": pixels["pixel_values"], "labels": batch["label"]}

        def encoded(ds):
            return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="images")

        return encoded(data.train), {n: encoded(ds) for n, ds in data.evals.items()}, default_data_collator

    def evaluate(self, acc, model, evals: dict, collate, cfg) -> dict[str, float]:
        return evaluate(acc, model, evals, collate, cfg.eval_batch_size)
