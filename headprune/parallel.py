"""Parallel text for translation: the layout fairseq's `prepare-iwslt14.sh` writes, plain parallel
files, JSONL/CSV/TSV with two text columns, a `datasets` name, and the offline German-English
sentence pairs of the Ding dictionary (Debian's trans-de-en). Every source becomes one shape: a
training set and named evaluation sets of (source, target) strings, with subword markers (`@@ `)
already undone, and a note of whether the text was tokenised (Moses) beforehand."""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from .data import HELD_OUT_SEED, note_held_out, read_records
from .errors import DataError, first_line

log = logging.getLogger("headprune")

DING_FILE = Path("/usr/share/trans/de-en")
DING_SEED, DING_TEST, DING_VALID = 0, 1000, 500


@dataclass
class ParallelData:
    train: Dataset  # columns: source, target
    evals: dict[str, Dataset]  # split name -> dataset, named as what it is
    source_lang: str
    target_lang: str
    tokenized: bool = False  # Moses-tokenised text (fairseq layout): BLEU on it is "tokenized BLEU"
    dropped_rows: dict[str, int] = field(default_factory=dict)


def remove_bpe(line: str) -> str:
    """Undo subword-nmt's markers: "ge@@ hen" -> "gehen" (fairseq's --remove-bpe)."""
    return re.sub(r"@@( |$)", "", line)


def _lines(path: Path) -> list[str]:
    try:
        # lines end at "\n" only: str.splitlines would also cut at U+2028, NEL and other breaks
        # inside a sentence and shift every later pair
        text = path.read_text(encoding="utf-8")
        return [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")] if text else []
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:  # a folder, a file that cannot be read
        raise DataError(f"cannot read {path}: {err.strerror or first_line(err)}") from err


def _pairs(source: Path, target: Path, drop: bool, dropped: dict) -> Dataset:
    src, tgt = _lines(source), _lines(target)
    if len(src) != len(tgt):
        raise DataError(f"{source} has {len(src)} lines but {target} has {len(tgt)}: they must be line-aligned")
    if not src:
        raise DataError(f"{source} is empty")
    rows = []
    for number, (s, t) in enumerate(zip(src, tgt), start=1):
        if not s.strip() or not t.strip():
            if not drop:
                empty = source if not s.strip() else target
                raise DataError(f"{empty}, line {number}: empty line (fix it, or pass --drop-incomplete-rows)")
            dropped[str(source)] = dropped.get(str(source), 0) + 1
            continue
        rows.append((remove_bpe(s.strip()), remove_bpe(t.strip())))
    note_dropped(source, dropped.get(str(source), 0), len(src))
    return Dataset.from_dict({"source": [s for s, _ in rows], "target": [t for _, t in rows]})


def note_dropped(where, dropped: int, total: int) -> None:
    """--drop-incomplete-rows said aloud, as classification data says it (results.json records it too)."""
    if dropped:
        log.warning("%s: dropped %d of %d sentence pairs with an empty or missing side", where, dropped, total)


def parallel_folder(folder: Path, source_lang: str, target_lang: str, drop: bool = False) -> ParallelData:
    """`train.de` / `train.en`, `valid.*`, `test.*` (fairseq's prepare-iwslt14.sh writes this, BPE'd
    with `@@ ` markers; plain untokenised files work the same). Splits other than train are
    evaluation splits; `valid` is first."""
    names = sorted({p.stem for p in folder.glob(f"*.{source_lang}")}, key=lambda n: (n != "valid", n))
    for name in names:
        if not (folder / f"{name}.{target_lang}").is_file():
            raise DataError(f"{folder} has {name}.{source_lang} but no {name}.{target_lang}")
    if "train" not in names:
        raise DataError(f"{folder} holds no train.{source_lang} and train.{target_lang}")
    if len(names) < 2:
        raise DataError(f"{folder} holds no evaluation split (valid.{source_lang}, test.{source_lang}, ...)")
    dropped: dict = {}
    splits = {n: _pairs(folder / f"{n}.{source_lang}", folder / f"{n}.{target_lang}", drop, dropped) for n in names}
    sample = "\n".join(_lines(folder / f"train.{source_lang}"))[:200_000]  # read once already: readable UTF-8
    tokenized = " &apos;" in sample or " &quot;" in sample or bool(re.search(r"\w @@|@@ \w", sample)) \
        or bool(re.search(r"\w \.$", sample, flags=re.M))
    return ParallelData(splits.pop("train"), splits, source_lang, target_lang, tokenized, dropped)


def parallel_files(train_file: str, eval_files: list[str] | None, columns: list[str] | None,
                   source_lang: str, target_lang: str, drop: bool = False) -> ParallelData:
    """JSONL/JSON/CSV/TSV with a source and a target column (default: the language codes)."""
    columns = list(columns or [source_lang, target_lang])
    if len(columns) != 2:
        raise DataError(f"translation needs two text columns (source, target); got {columns}")
    dropped: dict = {}

    def load(path: str) -> Dataset:
        rows, where = read_records(path)
        present = list(dict.fromkeys(c for r in rows for c in r))
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{path} has no column(s) {missing}; its columns are {present} "
                            "(choose source and target with --text-columns)")
        kept = []
        for row, place in zip(rows, where):
            cells = [row.get(c) for c in columns]
            if any(not isinstance(c, str) or not c.strip() for c in cells):
                if not drop:
                    bad = 0 if not isinstance(cells[0], str) or not cells[0].strip() else 1
                    what = ("is empty or missing" if cells[bad] is None or isinstance(cells[bad], str) else
                            f"holds {json.dumps(cells[bad])}, not text")
                    raise DataError(f"{path}, {place}: the text cell of column {columns[bad]!r} {what} "
                                    "(fix it, or pass --drop-incomplete-rows)")
                dropped[path] = dropped.get(path, 0) + 1
                continue
            kept.append([remove_bpe(c.strip()) for c in cells])
        note_dropped(path, dropped.get(path, 0), len(rows))
        return Dataset.from_dict({"source": [s for s, _ in kept], "target": [t for _, t in kept]})

    train = load(train_file)
    if eval_files:
        evals = {Path(f).stem: load(f) for f in eval_files}
    else:
        split = train.train_test_split(test_size=0.1, seed=HELD_OUT_SEED)
        train, evals = split["train"], {"heldout": split["test"]}
        note_held_out(train_file, len(train), len(evals["heldout"]))
    return ParallelData(train, evals, source_lang, target_lang, False, dropped)


# -- the offline default: sentence pairs of the Ding dictionary ------------------------------------

_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]|\([^)]*\)")
_PLACEHOLDERS = ("etw.", "jdm.", "jdn.", "jds.", "jd.", "sth.", "sb.", "sb.'s", "sb.’s")  # "... für etw.": a phrase


def _clean(entry: str) -> str:
    return " ".join(_ANNOTATION.sub(" ", entry.split("; ")[0]).split())


def ding_pairs(path: Path = DING_FILE) -> list[tuple[str, str]]:
    """Whole-sentence pairs of the Ding German-English dictionary: entries `German | ... :: English
    | ...` are aligned alternative by alternative; of each the first variant (before `;`), without
    annotations in {}, [] and (); kept when both sides have at least 5 words and end in . ? or !
    (not in a placeholder such as "etw." or "sth.": those are phrases); duplicates dropped."""
    if not path.is_file():
        raise DataError(f"{path} is missing: the offline translation data is Debian's Ding dictionary "
                        "(apt-get install trans-de-en)")
    pairs, seen = [], set()
    for line in _lines(path):
        if line.startswith("#") or " :: " not in line:
            continue
        german, english = line.split(" :: ", 1)
        for de, en in zip(german.split(" | "), english.split(" | ")):
            de, en = _clean(de), _clean(en)
            if (len(de.split()) >= 5 and len(en.split()) >= 5 and de[-1] in ".?!" and en[-1] in ".?!"
                    and not de.endswith(_PLACEHOLDERS) and not en.endswith(_PLACEHOLDERS) and (de, en) not in seen):
                seen.add((de, en))
                pairs.append((de, en))
    return pairs


def ding(path: Path = DING_FILE) -> ParallelData:
    """The Ding sentence pairs, shuffled with a fixed seed: the first 1,000 are `test`, the next
    500 `valid`, the rest train."""
    pairs = ding_pairs(path)
    random.Random(DING_SEED).shuffle(pairs)

    def dataset(rows):
        return Dataset.from_dict({"source": [s for s, _ in rows], "target": [t for _, t in rows]})

    test, valid, train = pairs[:DING_TEST], pairs[DING_TEST:DING_TEST + DING_VALID], pairs[DING_TEST + DING_VALID:]
    return ParallelData(dataset(train), {"valid": dataset(valid), "test": dataset(test)}, "de", "en")


def load_parallel(dataset: str, *, eval_files=None, text_columns=None, source_lang: str = "de",
                  target_lang: str = "en", drop_incomplete: bool = False) -> ParallelData:
    """Load any supported parallel data; raises DataError with the reason."""
    if dataset == "offline:ding-de-en":
        return ding()
    path = Path(dataset)
    if path.is_dir():
        return parallel_folder(path, source_lang, target_lang, drop_incomplete)
    if path.suffix.lower() in (".csv", ".tsv", ".json", ".jsonl"):
        return parallel_files(dataset, eval_files, text_columns, source_lang, target_lang, drop_incomplete)
    if dataset.startswith("hf:"):
        return _from_hub(dataset.removeprefix("hf:"), source_lang, target_lang)
    raise DataError(f"cannot tell what parallel data {dataset!r} is: give 'offline:ding-de-en', a folder "
                    "of train/valid/test.<lang> files, a .jsonl/.json/.csv/.tsv file with two text "
                    "columns, or 'hf:<dataset name>' (a translation data set in the datasets library)")


def _from_hub(name: str, source_lang: str, target_lang: str) -> ParallelData:
    """A datasets translation set (rows {"translation": {"de": ..., "en": ...}}), e.g.
    hf:bbaw_egyptian or hf:iwslt2017 with its config after a colon: hf:iwslt2017:iwslt2017-de-en."""
    from datasets import load_dataset

    path, _, config = name.partition(":")
    try:
        splits = load_dataset(path, config or None)
    except Exception as err:
        raise DataError(f"cannot load {name!r} through datasets: {first_line(err)}") from err

    def convert(split):
        if "translation" not in splits[split].column_names:
            raise DataError(f"{name}: its {split} split has no 'translation' column (rows of "
                            f"{{{source_lang!r}: ..., {target_lang!r}: ...}})")
        pairs = splits[split]["translation"]
        missing = {source_lang, target_lang} - set(pairs[0] if pairs else ())
        if missing:
            raise DataError(f"{name}: its translations have no {', '.join(sorted(missing))} "
                            f"(they have {', '.join(sorted(pairs[0]))}); set --source-lang and --target-lang")
        return Dataset.from_dict({"source": [p[source_lang] for p in pairs], "target": [p[target_lang] for p in pairs]})

    if "train" not in splits:
        raise DataError(f"{name} has no train split (it has {', '.join(splits)})")
    evals = {split: convert(split) for split in splits if split != "train"}
    return ParallelData(convert("train"), evals, source_lang, target_lang)
