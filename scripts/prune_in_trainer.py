"""Prune attention heads inside your own Hugging Face Trainer script (headprune.integrations).

Fine-tunes MiniLM-L6 on Rotten Tomatoes snippets with a plain `Trainer` while DSP learns which
--k heads to keep; at the end the model is pruned and saved in --output-dir/pruned, and its
validation accuracy printed. Everything but the callback line is an ordinary Trainer script.

    python scripts/prune_in_trainer.py --k 24 --max-steps 125 --output-dir runs/trainer-dsp24
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

from headprune.data import load_classification, subsample
from headprune.errors import HeadpruneError
from headprune.integrations import HeadPruningCallback
from headprune.tasks.base import resolve_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=24, help="heads to keep (of 72)")
    parser.add_argument("--method", default="dsp", choices=["dsp", "ste", "voita"])
    parser.add_argument("--max-steps", type=int, default=125)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, choices=[1, 2, 4, 8, 16, 32],
                        help="micro-batches a step (32 examples a step in all; each micro-batch draws its own noise)")
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--eval-examples", type=int, default=2000)
    parser.add_argument("--output-dir", default="runs/trainer-dsp")
    parser.add_argument("--overwrite", action="store_true", help="replace a pruned model saved there before")
    args = parser.parse_args(argv)
    try:  # bad options (k, an occupied folder): one line, and the first before any loading
        train_and_prune(args)
    except HeadpruneError as err:
        print(f"prune_in_trainer.py: error: {err}", file=sys.stderr)
        sys.exit(2)


def train_and_prune(args) -> None:
    callback = HeadPruningCallback(k=args.k, method=args.method, output_dir=f"{args.output_dir}/pruned",
                                   overwrite=args.overwrite)
    callback.check_folder(Path(args.output_dir) / "pruned")

    path = resolve_model("offline:minilm-l6")
    data = subsample(load_classification("offline:rotten-tomatoes"), args.train_examples, args.eval_examples)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.label_names))

    def encode(ds):
        return ds.map(lambda b: tokenizer(*[b[c] for c in data.text_columns], truncation=True, max_length=64), batched=True,
                      remove_columns=data.text_columns)

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, train_dataset=encode(data.train), eval_dataset=encode(data.evals["validation"]),
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=accuracy, callbacks=[callback],
                      args=TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=5e-5,
                                             per_device_train_batch_size=32 // args.gradient_accumulation_steps,
                                             gradient_accumulation_steps=args.gradient_accumulation_steps,
                                             logging_steps=10, report_to="none",
                                             save_strategy="no", seed=0))
    trainer.train()
    print(f"kept {len(callback.kept_heads)} heads: {callback.kept_heads}")
    print(f"validation accuracy of the pruned model: {trainer.evaluate()['eval_accuracy']:.4f}")


if __name__ == "__main__":
    main()
