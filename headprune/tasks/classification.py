"""Sequence classification: GLUE, the offline Rotten Tomatoes benchmark and local files (read by
headprune.data), a classifier head with the data's label names, accuracy per evaluation split."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader
from ..progress import progress_bar
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from ..data import ClassificationData, load_classification, subsample
from ..errors import ModelError
from ..pruning import SAFE_WEIGHTS, load_pruned
from .base import Task, load_tokenizer, loading_weights, token_limit, weights_dtype

log = logging.getLogger("headprune")


class Classification(Task):
    name = "classification"
    metric = "accuracy"
    auto_class = AutoModelForSequenceClassification
    architecture_suffixes = ("ForSequenceClassification",)
    trained_model = "a fine-tuned classifier"

    def load_data(self, cfg) -> ClassificationData:
        data = load_classification(cfg.dataset, eval_files=cfg.eval_files, text_columns=cfg.text_columns,
                                   label_column=cfg.label_column, glue_task=cfg.glue_task,
                                   drop_incomplete=cfg.drop_incomplete_rows)
        return subsample(data, cfg.max_train_examples, cfg.max_eval_examples)

    def results(self, data: ClassificationData) -> dict:
        return {"labels": data.label_names, "dropped_rows": data.dropped_rows}

    def load_model(self, cfg, data: ClassificationData, path: str, config, require_finetuned: bool):
        return load_model(cfg.model, path, config, data.label_names, cfg.attn_implementation, require_finetuned,
                          weights_dtype(cfg))

    def prepare(self, data: ClassificationData, tokenizer, cfg):
        limit = token_limit(cfg, tokenizer)

        def encode(batch):
            return tokenizer(*[batch[c] for c in data.text_columns], truncation=True, max_length=limit)

        def tokenize(ds):
            return ds.map(encode, batched=True, remove_columns=data.text_columns, desc="tokenize")

        return tokenize(data.train), {n: tokenize(ds) for n, ds in data.evals.items()}, DataCollatorWithPadding(tokenizer)

    def evaluate(self, acc, model, evals: dict, collate, cfg) -> dict[str, float]:
        return evaluate(acc, model, evals, collate, cfg.eval_batch_size)


def _generic_label_names(config) -> bool:
    return all(str(v) == f"LABEL_{i}" for i, v in sorted((config.id2label or {}).items()))


def load_model(name: str, path: str, config, labels: list[str], attn: str, require_finetuned: bool,
               dtype: dict | None = None):
    """The model with a classifier for `labels` (their names go into its config) and its tokenizer;
    `dtype`: the weights' dtype keyword ({} or {"dtype": ...}, see `weights_dtype`)."""
    dtype = dtype or {}
    tokenizer = load_tokenizer(name, path)
    names = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    pruned = (getattr(config, "headprune", None) or {}).get("physical", False)  # to prune further
    if require_finetuned or pruned:
        if config.num_labels != len(labels):
            raise ModelError(f"{name!r} predicts {config.num_labels} labels, the data has {len(labels)} "
                             f"({', '.join(labels)})")
        model_labels = [config.id2label[i] for i in range(config.num_labels)]
        if not _generic_label_names(config) and model_labels != labels:
            raise ModelError(f"{name!r} was trained for the labels {model_labels}, the data has {labels}")
    with loading_weights(repr(name)):
        if pruned:
            model = load_pruned(path, attn_implementation=attn, **dtype).train()
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(labels), attn_implementation=attn, output_loading_info=True, **SAFE_WEIGHTS, **dtype,
                ignore_mismatched_sizes=not require_finetuned, **(names if not require_finetuned else {}))
    model.config.update(names)  # the saved model says which index is which label
    if pruned:
        return model, tokenizer
    new = sorted(info["missing_keys"])
    if require_finetuned and new:
        raise ModelError(f"{name!r} is not a fine-tuned classifier (it lacks {new[:3]}); pipelined "
                         "pruning starts from one: run `headprune finetune` first, or use --mode joint")
    if new:
        log.warning("%s has no classification head for these %d labels: headprune adds a new, randomly "
                    "initialised one (%s); it is trained now, in this run", name, len(labels),
                    ", ".join(sorted({k.split(".")[0] for k in new})))
    return model, tokenizer


@torch.no_grad()
def evaluate(acc, model, datasets: dict, collate, batch_size: int) -> dict[str, float]:
    """Accuracy on each evaluation split, gathered over processes."""
    was_training = model.training
    model.eval()
    scores = {}
    for name, ds in datasets.items():
        loader = acc.prepare(DataLoader(ds, batch_size=batch_size, collate_fn=collate))
        correct = seen = 0
        for batch in progress_bar(loader, desc=f"evaluate {name}", leave=False, disable=not acc.is_local_main_process):
            labels = batch.pop("labels")
            predictions = model(**batch).logits.argmax(-1)
            predictions, labels = acc.gather_for_metrics((predictions, labels))
            correct += (predictions == labels).sum().item()
            seen += labels.numel()
        scores[name] = correct / seen
    model.train(was_training)
    return scores


