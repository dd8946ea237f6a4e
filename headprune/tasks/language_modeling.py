"""Causal language modelling with decoder-only models (Llama, Mistral, Qwen, SmolLM): documents
joined with the end-of-text token and packed into blocks of `--max-length` tokens, next-token
cross-entropy, perplexity on held-out text (lower is better)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from ..progress import progress_bar
from transformers import AutoModelForCausalLM

from ..errors import ConfigError, DataError, ModelError
from ..pruning import SAFE_WEIGHTS, load_pruned
from ..text import TextData, load_text
from ..data import subsample
from .base import Task, load_tokenizer, loading_weights, weights_dtype


def pack(documents: list[str], tokenizer, block: int) -> list[list[int]]:
    """Token ids of the documents, each followed by the end-of-text token, cut into blocks of
    `block` tokens (the remainder shorter than a block is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for tokens in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += tokens + ([eos] if eos is not None else [])
    return [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]


def collate(blocks: list[dict]) -> dict:
    ids = torch.tensor([b["input_ids"] for b in blocks])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class LanguageModeling(Task):
    name = "causal-lm"
    metric = "perplexity"
    higher_is_better = False
    auto_class = AutoModelForCausalLM
    architecture_suffixes = ("ForCausalLM", "LMHeadModel")  # GPT-2: GPT2LMHeadModel
    trained_model = "a causal language model"

    def check_model(self, name: str, config, sites) -> None:
        """Only decoders: an encoder's attention sees the tokens it is asked to predict (a BERT
        loaded as a language model would report a perplexity that means nothing)."""
        kinds = sorted({site.kind for site in sites})
        if kinds != ["decoder"] or config.is_encoder_decoder:
            raise ModelError(f"{name!r} is a {config.model_type} model whose attention is not causal (it has "
                             f"{' and '.join(kinds)} attention); --task causal-lm needs a decoder-only language "
                             "model (Llama, Mistral, Qwen, SmolLM)")

    def check_settings(self, cfg, config) -> None:
        """Blocks of --max-length tokens must fit the model's positions (GPT-2's lookup fails past them;
        rotary models run on, at lengths they never saw)."""
        positions = getattr(config.get_text_config(), "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.max_length > positions:
            raise ConfigError(f"--max-length {cfg.max_length}: longer than the model's {positions} positions (a "
                              "language model's text is cut into blocks of --max-length tokens)")

    def load_data(self, cfg) -> TextData:
        return subsample(load_text(cfg.dataset, cfg.eval_files), cfg.max_train_examples, cfg.max_eval_examples)

    def load_model(self, cfg, data, path: str, config, require_finetuned: bool):
        tokenizer = load_tokenizer(cfg.model, path)
        with loading_weights(repr(cfg.model)):
            if (getattr(config, "headprune", None) or {}).get("physical"):
                model = load_pruned(path, attn_implementation=cfg.attn_implementation, **weights_dtype(cfg))
            else:
                model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=cfg.attn_implementation,
                                                             **SAFE_WEIGHTS, **weights_dtype(cfg))
        return model.train(), tokenizer

    def examples(self, cfg) -> str:
        return f"blocks of {cfg.max_length} tokens"

    def prepare(self, data: TextData, tokenizer, cfg):
        from datasets import Dataset

        def blocks(documents: list[str], split: str) -> Dataset:
            packed = pack(documents, tokenizer, cfg.max_length) if documents else []
            if not packed:
                raise DataError(f"the {split} text is shorter than one block of {cfg.max_length} tokens "
                                "(--max-length)")
            return Dataset.from_dict({"input_ids": packed})
        return blocks(data.train, "training"), {n: blocks(d, n) for n, d in data.evals.items()}, collate

    @torch.no_grad()
    def evaluate(self, acc, model, evals: dict, collate, cfg) -> dict[str, float]:
        """Perplexity on each split: exp of the mean next-token cross-entropy over all its tokens
        (every block has the same length, so the mean over blocks is the mean over tokens)."""
        was_training = model.training
        model.eval()
        scores = {}
        for name, ds in evals.items():
            loader = acc.prepare(DataLoader(ds, batch_size=cfg.eval_batch_size, collate_fn=collate))
            losses = []
            for batch in progress_bar(loader, desc=f"evaluate {name}", leave=False, disable=not acc.is_local_main_process):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # a block at a time: float32 copies of one block's logits, not of the batch's (a vocabulary
                # of 128k tokens makes the batch's several GB)
                per_token = torch.stack([F.cross_entropy(block[:-1].float(), labels[1:], reduction="none")
                                         for block, labels in zip(logits, batch["labels"])])
                losses.append(acc.gather_for_metrics(per_token.mean(1)))
            scores[name] = math.exp(torch.cat(losses).mean().item())
        model.train(was_training)
        return scores
