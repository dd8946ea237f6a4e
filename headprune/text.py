"""Plain text for causal language modelling: documents (strings) per split, from the offline
review snippets, text files or the datasets library. Packing into blocks is the task's job."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .data import HELD_OUT_SEED, note_held_out
from .errors import DataError, first_line


@dataclass
class TextData:
    train: list[str]
    evals: dict[str, list[str]]  # split name -> documents


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from err
    documents = [line.strip() for line in text.split("\n") if line.strip()]  # not at U+2028 and the like
    if not documents:
        raise DataError(f"{path} holds no text")
    return documents


def _texts(column: list, dataset: str, split: str) -> list[str]:
    """The non-empty texts of a datasets column (missing cells left out; anything else but text refused)."""
    for row, text in enumerate(column):
        if text is not None and not isinstance(text, str):
            raise DataError(f"{dataset}: row {row} of its {split} split holds {type(text).__name__} {text!r} in "
                            "the 'text' column, not text")
    return [t for t in column if t is not None and t.strip()]


def load_text(dataset: str, eval_files: list[str] | None = None) -> TextData:
    """`offline:rotten-tomatoes` (the review snippets as documents, in the fixed splits of the
    classification benchmark), a folder of `train.txt` (+ `validation.txt`, `test.txt`), a `.txt`
    file (a document per non-empty line; `eval_files` or a held-out 10%), or `hf:<name>[:<config>]`
    (its `text` column, every split)."""
    if dataset in ("offline:rotten-tomatoes", "offline:subjectivity"):
        from .data import OFFLINE
        data = OFFLINE[dataset]()
        return TextData(list(data.train["text"]), {n: list(ds["text"]) for n, ds in data.evals.items()})
    if dataset.startswith("hf:"):
        from datasets import load_dataset
        name, _, config = dataset.removeprefix("hf:").partition(":")
        try:
            splits = load_dataset(name, config or None)
        except Exception as err:  # the datasets library raises many kinds
            raise DataError(f"cannot load {dataset}: {first_line(err)}") from err
        if "train" not in splits or "text" not in splits["train"].column_names:
            has = (f"its train split has {', '.join(splits['train'].column_names)}" if "train" in splits
                   else f"its splits are {', '.join(splits)}")
            raise DataError(f"{dataset} needs a train split with a 'text' column ({has})")
        return TextData(_texts(splits["train"]["text"], dataset, "train"),
                        {n: _texts(ds["text"], dataset, n) for n, ds in splits.items() if n != "train"})
    path = Path(dataset)
    if path.is_dir():
        if not (path / "train.txt").is_file():
            raise DataError(f"{dataset} is a folder but holds no train.txt")
        evals = {name: _lines(path / f"{name}.txt") for name in ("validation", "test") if (path / f"{name}.txt").is_file()}
        if not evals:  # (every metric of the run would be missing)
            raise DataError(f"{dataset} holds train.txt but no validation.txt or test.txt to evaluate on")
        return TextData(_lines(path / "train.txt"), evals)
    if path.suffix == ".txt":
        documents = _lines(path)
        if eval_files:
            return TextData(documents, {Path(f).stem: _lines(Path(f)) for f in eval_files})
        if len(documents) < 2:
            raise DataError(f"{path} holds one document: a tenth of them is held out to evaluate on, so it needs "
                            "two or more (or give --eval-files)")
        order = list(range(len(documents)))
        random.Random(HELD_OUT_SEED).shuffle(order)
        cut = max(1, len(documents) // 10)
        note_held_out(path, len(documents) - cut, cut)
        return TextData([documents[i] for i in sorted(order[cut:])],
                        {"heldout": [documents[i] for i in sorted(order[:cut])]})
    raise DataError(f"cannot tell what text {dataset!r} is: give 'offline:rotten-tomatoes', a .txt "
                    "file, a folder with train.txt, or 'hf:<name>[:<config>]'")
