"""Translation with encoder-decoders (Marian, BART, mBART): parallel text (headprune.parallel), a
model trained from scratch with a subword vocabulary learned from the training side (saved with
the model, so the output folder is a complete translation model) or any pretrained seq2seq
checkpoint, label-smoothed cross-entropy, Adam (0.9, 0.98) with an inverse-square-root schedule,
and BLEU from beam search.

Metrics, each named as what it is: `<split>` is sacreBLEU (13a) on detokenised text, the
headline; `<split> tokenized BLEU` is BLEU on the Moses-tokenised, lower-cased text that fairseq
papers report (only for tokenised data such as fairseq's IWSLT14 layout); `<split> chrF`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from ..progress import progress_bar
from transformers import AutoModelForSeq2SeqLM, MarianConfig, MarianMTModel, PreTrainedTokenizerFast

from ..errors import ModelError
from ..parallel import ParallelData, load_parallel
from ..data import subsample
from ..pruning import SAFE_WEIGHTS, load_pruned
from .base import Task, load_tokenizer, loading_weights, token_limit, weights_dtype

log = logging.getLogger("headprune")

# Models trained from scratch: `--model scratch:<name>`. The reference's IWSLT shape
# (fairseq transformer_iwslt_de_en: 6+6 layers, d=512, 4 heads, FFN 1024 = 72 heads), a small one
# that trains on 2 CPU cores in minutes, and a tiny one for tests.
SCRATCH = {
    "transformer-iwslt-de-en": dict(d_model=512, layers=6, heads=4, ffn=1024),
    "transformer-small": dict(d_model=256, layers=3, heads=4, ffn=512),
    "transformer-tiny": dict(d_model=32, layers=2, heads=4, ffn=64),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3


def scratch_config(name: str, vocab_size: int, dropout: float = 0.3) -> MarianConfig:
    shape = SCRATCH[name]
    return MarianConfig(
        vocab_size=vocab_size, d_model=shape["d_model"], encoder_layers=shape["layers"],
        decoder_layers=shape["layers"], encoder_attention_heads=shape["heads"],
        decoder_attention_heads=shape["heads"], encoder_ffn_dim=shape["ffn"], decoder_ffn_dim=shape["ffn"],
        dropout=dropout, attention_dropout=0.0, activation_dropout=0.0, activation_function="relu",
        scale_embedding=True, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, architectures=["MarianMTModel"])


def learn_vocabulary(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A joint BPE vocabulary for both languages (the reference learns a joint BPE of 10k), with
    SentencePiece-style word boundaries so that decoding gives back plain text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def inverse_sqrt(warmup_steps: int):
    """fairseq's inverse_sqrt: linear warm-up to the peak, then the peak x sqrt(warmup / step)."""
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        step += 1
        return min(step / warmup, math.sqrt(warmup / step))
    return factor


class Translation(Task):
    name = "translation"
    metric = "bleu"
    auto_class = AutoModelForSeq2SeqLM
    architecture_suffixes = ("ForConditionalGeneration", "MTModel")
    trained_model = "a trained translation model"
    betas = (0.9, 0.98)

    def __init__(self):
        self.tokenized = False  # set by load_data
        self.model_config_ = self.tokenizer = None  # set by load_model and prepare
        self.label_smoothing, self.target_lang = 0.1, "en"

    # -- the model -------------------------------------------------------------------------------

    def model_config(self, name: str):
        if name.startswith("scratch:"):
            preset = name.removeprefix("scratch:")
            if preset not in SCRATCH:
                raise ModelError(f"unknown model {name!r}; from scratch: "
                                 f"{', '.join('scratch:' + n for n in SCRATCH)}")
            return None, scratch_config(preset, vocab_size=len(SPECIALS) + 1)
        return super().model_config(name)

    def load_model(self, cfg, data: ParallelData, path, config, require_finetuned: bool):
        if path is None:  # from scratch: the vocabulary is learned from the training side
            tokenizer = learn_vocabulary(list(data.train["source"]) + list(data.train["target"]), cfg.vocab_size)
            model = MarianMTModel(scratch_config(cfg.model.removeprefix("scratch:"), len(tokenizer), cfg.dropout))
            log.info("a new %s translation model (%d parameters, vocabulary of %d learned from the "
                     "training side)", cfg.model, sum(p.numel() for p in model.parameters()), len(tokenizer))
        else:
            tokenizer = load_tokenizer(cfg.model, path)
            with loading_weights(repr(cfg.model)):
                pruned = (getattr(config, "headprune", None) or {}).get("physical", False)
                model = (load_pruned(path, attn_implementation=cfg.attn_implementation, **weights_dtype(cfg))
                         if pruned else
                         AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation=cfg.attn_implementation,
                                                               **SAFE_WEIGHTS, **weights_dtype(cfg)))
        model.set_attn_implementation(cfg.attn_implementation)
        self.model_config_ = model.config
        self.label_smoothing, self.target_lang = cfg.label_smoothing, cfg.target_lang
        return model.train(), tokenizer

    # -- data --------------------------------------------------------------------------------------

    def load_data(self, cfg) -> ParallelData:
        data = load_parallel(cfg.dataset, eval_files=cfg.eval_files, text_columns=cfg.text_columns,
                             source_lang=cfg.source_lang, target_lang=cfg.target_lang,
                             drop_incomplete=cfg.drop_incomplete_rows)
        self.tokenized = data.tokenized
        return subsample(data, cfg.max_train_examples, cfg.max_eval_examples)

    def results(self, data: ParallelData) -> dict:
        return {"languages": [data.source_lang, data.target_lang], "tokenized_data": data.tokenized,
                "dropped_rows": data.dropped_rows}

    def prepare(self, data: ParallelData, tokenizer, cfg):
        limit = token_limit(cfg, tokenizer)

        def encode(batch):
            encoded = tokenizer(batch["source"], text_target=batch["target"], truncation=True, max_length=limit)
            encoded["length"] = [max(len(s), len(t)) for s, t in zip(encoded["input_ids"], encoded["labels"])]
            return encoded

        train = data.train.map(encode, batched=True, remove_columns=["source", "target"], desc="tokenize")
        evals = {n: ds.map(encode, batched=True, desc="tokenize") for n, ds in data.evals.items()}
        self.tokenizer = tokenizer
        return train, evals, self.collate

    def collate(self, rows: list[dict]) -> dict:
        """Pad sources and targets; the decoder reads the target shifted right after the start token."""
        pad, start = self.model_config_.pad_token_id, self.model_config_.decoder_start_token_id
        sources = [torch.tensor(r["input_ids"]) for r in rows]
        targets = [torch.tensor(r["labels"]) for r in rows]
        input_ids = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=pad)
        labels = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=-100)
        decoder_input_ids = torch.cat([torch.full((len(rows), 1), start), labels[:, :-1]], dim=1)
        decoder_input_ids[decoder_input_ids == -100] = pad
        return {"input_ids": input_ids, "attention_mask": (input_ids != pad).long(),
                "decoder_input_ids": decoder_input_ids, "labels": labels}

    # -- loss and metric ------------------------------------------------------------------------------

    def loss(self, model, batch) -> torch.Tensor:
        """Label-smoothed cross-entropy, mean over target tokens (fairseq sums; the mean keeps the
        learning rate independent of the batch size)."""
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)

    def schedule(self, cfg, steps: int):
        return inverse_sqrt(cfg.warmup_steps)

    @torch.no_grad()
    def evaluate(self, acc, model, evals: dict, collate, cfg) -> dict[str, float]:
        """Beam search (`--beam`) over each evaluation split; BLEU and chrF of the outputs."""
        was_training = model.training
        model.eval()
        generator = acc.unwrap_model(model)
        scores = {}
        for name, ds in evals.items():
            loader = acc.prepare(DataLoader(ds.select_columns(["input_ids", "target"]), batch_size=cfg.generation_batch_size,
                                            collate_fn=self.generation_batch))
            hypotheses, references = [], []
            for batch in progress_bar(loader, desc=f"translate {name} (beam {cfg.beam})", leave=False,
                              disable=not acc.is_local_main_process):
                refs = batch.pop("references")
                length = batch["input_ids"].shape[1]
                out = generator.generate(**batch, num_beams=cfg.beam, do_sample=False,
                                         max_new_tokens=int(1.2 * length + 10))  # the reference's max_len_a, b
                hyps = self.tokenizer.batch_decode(out, skip_special_tokens=True)
                # gathered as one list of pairs: on the last batch accelerate cuts the gathered
                # object to the sentences left, which must not cut a (hypotheses, references) tuple
                pairs = acc.gather_for_metrics(list(zip(hyps, refs)), use_gather_object=True)
                hypotheses += [hyp for hyp, _ in pairs]
                references += [ref for _, ref in pairs]
            scores.update(bleu_scores(name, hypotheses, references, self.tokenized, self.target_lang))
        model.train(was_training)
        return scores

    def generation_batch(self, rows: list[dict]) -> dict:
        pad = self.model_config_.pad_token_id
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True,
                                              padding_value=pad)
        return {"input_ids": ids, "attention_mask": (ids != pad).long(), "references": [r["target"] for r in rows]}


def bleu_scores(split: str, hypotheses: list[str], references: list[str], tokenized: bool, lang: str = "en") -> dict:
    """sacreBLEU on detokenised text (the headline), chrF, and for Moses-tokenised data the
    tokenised BLEU of fairseq papers (BLEU-4 on the text as it is, tokenize='none')."""
    import sacrebleu

    hyps, refs = hypotheses, references
    scores = {}
    if tokenized:
        scores[f"{split} tokenized BLEU"] = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
        hyps, refs = detokenize(hyps, lang), detokenize(refs, lang)
    scores = {split: sacrebleu.corpus_bleu(hyps, [refs]).score, **scores,
              f"{split} chrF": sacrebleu.corpus_chrf(hyps, [refs]).score}
    return scores


def detokenize(lines: list[str], lang: str = "en") -> list[str]:
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split()) for line in lines]
