"""Classification data: the GLUE TSV layout, GLUE by name, local files, the default benchmark."""
import json

import pytest
from datasets import Dataset, DatasetDict

import headprune.data as data_mod
from headprune.data import DataError, load_classification, rotten_tomatoes, subsample
from headprune.parallel import load_parallel
from headprune.text import load_text

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def mnli_row(i, s1, s2, label):
    return f"{i}\t0\t0\tfiction\t(x)\t(y)\t(X)\t(Y)\t{s1}\t{s2}\t{label}\t{label}\n"


def test_glue_tsv_mnli_reports_matched_and_mismatched_separately(tmp_path):
    folder = tmp_path / "MNLI"
    folder.mkdir()
    (folder / "train.tsv").write_text(MNLI_HEADER + mnli_row(0, 'He said "hi', "He spoke.", "entailment")
                                      + mnli_row(1, "A cat.", "A dog.", "contradiction"))
    (folder / "dev_matched.tsv").write_text(MNLI_HEADER + mnli_row(0, "a", "b", "neutral"))
    (folder / "dev_mismatched.tsv").write_text(MNLI_HEADER + mnli_row(0, "c", "d", "entailment")
                                               + mnli_row(1, "e", "f", "neutral"))
    data = load_classification(str(folder))
    assert set(data.evals) == {"validation_matched", "validation_mismatched"}
    assert len(data.evals["validation_mismatched"]) == 2
    assert data.label_names == ["entailment", "neutral", "contradiction"]  # the datasets library's order
    assert data.train["label"] == [0, 2]
    assert data.train["premise"][0] == 'He said "hi'  # a stray quote is kept as text
    assert data.text_columns == ["premise", "hypothesis"]


def test_glue_tsv_cola_has_no_header_and_needs_the_task_name(tmp_path):
    folder = tmp_path / "my-cola"
    folder.mkdir()
    (folder / "train.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze.\nclc95\t0\t*\tThem left.\n")
    (folder / "dev.tsv").write_text("gj04\t1\t\tThey left.\n")
    with pytest.raises(DataError, match="unknown GLUE task 'my-cola'"):
        load_classification(str(folder))
    data = load_classification(str(folder), glue_task="cola")
    assert data.train["label"] == [1, 0] and data.train["sentence"][1] == "Them left."
    assert set(data.evals) == {"validation"}


def test_glue_tsv_missing_dev_file(tmp_path):
    folder = tmp_path / "RTE"
    folder.mkdir()
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match="has no dev.tsv"):
        load_classification(str(folder))


def test_glue_by_name_goes_through_datasets_and_names_mnli_splits(monkeypatch):
    def fake_load_dataset(path, name):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        row = {"premise": ["p"], "hypothesis": ["h"], "label": [1], "idx": [0]}
        return DatasetDict({split: Dataset.from_dict(row) for split in
                            ["train", "validation_matched", "validation_mismatched", "test_matched"]})
    monkeypatch.setattr(data_mod, "load_dataset", fake_load_dataset)
    data = load_classification("glue:mnli")
    assert set(data.evals) == {"validation_matched", "validation_mismatched"}
    assert data.train.column_names == ["premise", "hypothesis", "label"]


def test_glue_by_name_without_the_hub_gives_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")
    monkeypatch.setattr(data_mod, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load GLUE task 'sst2' through datasets: offline"):
        load_classification("glue:sst2")
    with pytest.raises(DataError, match="STS-B is a regression task"):
        load_classification("glue:stsb")


def test_csv_with_string_labels_text_pairs_and_eval_files(tmp_path):
    (tmp_path / "train.csv").write_text("a,b,y\nx1,y1,pos\nx2,y2,neg\nx3,y3,pos\n")
    (tmp_path / "dev.csv").write_text("a,b,y\nx4,y4,neg\n")
    data = load_classification(str(tmp_path / "train.csv"), eval_files=[str(tmp_path / "dev.csv")],
                               text_columns=["a", "b"], label_column="y")
    assert data.label_names == ["neg", "pos"]
    assert data.train["label"] == [1, 0, 1]
    assert data.evals["dev"]["label"] == [0] and data.evals["dev"]["b"] == ["y4"]


def test_numeric_labels_sort_as_numbers_and_unknown_eval_labels_are_refused(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(f'{{"text": "t{i}", "label": {i % 11}}}' for i in range(22)))
    (tmp_path / "dev.jsonl").write_text('{"text": "t", "label": 12}')
    data = load_classification(str(tmp_path / "train.jsonl"))
    assert data.label_names[:3] == ["0", "1", "2"] and data.label_names[-1] == "10"
    assert set(data.evals) == {"heldout"} and len(data.evals["heldout"]) == 3  # 10% held out
    with pytest.raises(DataError, match=r"labels \['12'\] do not occur in the training file"):
        load_classification(str(tmp_path / "train.jsonl"), eval_files=[str(tmp_path / "dev.jsonl")])


def test_a_held_out_tenth_is_said_and_a_handful_is_warned_of(tmp_path, caplog):
    import logging
    (tmp_path / "two.csv").write_text("text,label\nfine,pos\nbad,neg\n")
    with caplog.at_level(logging.INFO, logger="headprune"):
        data = load_classification(str(tmp_path / "two.csv"))
    assert len(data.train) == len(data.evals["heldout"]) == 1
    said = {record.levelname: record.getMessage() for record in caplog.records}
    assert said["INFO"].endswith("two.csv: no evaluation data given: 1 of its 2 examples are held out (split "
                                 "'heldout') to evaluate on")
    assert said["WARNING"].endswith("two.csv: every metric of this run rests on 1 held-out example (and it trains on 1)")
    caplog.clear()
    (tmp_path / "many.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(100)))
    with caplog.at_level(logging.INFO, logger="headprune"):
        load_classification(str(tmp_path / "many.csv"))
    assert [r.levelname for r in caplog.records] == ["INFO"] and "10 of its 100 examples" in caplog.text


def test_unknown_dataset_string(tmp_path):
    with pytest.raises(DataError, match="cannot tell what data set 'imdb' is"):
        load_classification("imdb")
    with pytest.raises(DataError, match="holds no train.tsv"):
        load_classification(str(tmp_path))


def test_the_default_benchmark_split_is_fixed_and_disjoint():
    data = rotten_tomatoes()
    train, validation, test = data.train, data.evals["validation"], data.evals["test"]
    assert (len(train), len(validation), len(test)) == (8752, 2000, 2000)
    assert not set(train["text"]) & set(validation["text"])
    assert not set(test["text"]) & (set(train["text"]) | set(validation["text"]))
    assert len(set(train["text"])) == len(train)
    assert sum(validation["label"]) == 1151  # 57.6% positive
    assert "&amp;" not in " ".join(train["text"][:2000])
    assert rotten_tomatoes().train["text"][:5] == train["text"][:5]  # same order every time
    # the test split came from the end of the earlier training split: the first 4,000 training
    # snippets (what configs/rotten-tomatoes.yaml trains on) are those of earlier versions
    assert train["text"][0].startswith("Dogtown & Z-Boys evokes the blithe rebel fantasy")
    small = subsample(data, 100, 10)
    assert (len(small.train), len(small.evals["validation"])) == (100, 10)
    assert small.train["text"] == train["text"][:100]


def test_the_subjectivity_benchmark_is_balanced_fixed_and_disjoint():
    data = load_classification("offline:subjectivity")
    assert data.label_names == ["objective", "subjective"]
    splits = [data.train, data.evals["validation"], data.evals["test"]]
    assert [len(s) for s in splits] == [7084, 2000, 2000]
    texts = [set(s["text"]) for s in splits]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    labels = [label for s in splits for label in s["label"]]
    assert labels.count(0) == labels.count(1) == 5542
    words = [len(t.split()) for s in splits for t in s["text"]]
    assert min(words) >= 5 and max(words) <= 50
    assert load_classification("offline:subjectivity").train["text"][:5] == data.train["text"][:5]


@pytest.mark.parametrize("task,name,rows", [
    ("classification", "train.jsonl", [f'{{"text": "t{i}", "label": {i % 2}}}' for i in range(40)]),
    ("causal-lm", "train.txt", [f"document {i}" for i in range(40)]),
])
def test_the_held_out_tenth_is_the_same_whatever_the_seed(tmp_path, task, name, rows):
    # a prune with another seed than its fine-tune's must not evaluate on what the fine-tune learnt
    # from, and a sweep's seeds are compared on the same examples
    from headprune.config import PruneConfig
    from headprune.tasks import get_task
    (tmp_path / name).write_text("\n".join(rows))
    held = [get_task(task).load_data(PruneConfig(task=task, dataset=str(tmp_path / name), seed=seed)).evals["heldout"]
            for seed in (0, 1, 7)]
    held = [list(h["text"]) if task == "classification" else h for h in held]
    assert held[0] == held[1] == held[2] and len(held[0]) == 4


def test_a_datasets_set_without_a_text_column_is_told_what_it_has(tmp_path):
    from headprune.errors import DataError
    from headprune.text import load_text
    (tmp_path / "train.csv").write_text("content,id\nsome words,1\nmore words,2\n")
    with pytest.raises(DataError, match=r"needs a train split with a 'text' column \(its train split has content, id\)"):
        load_text(f"hf:{tmp_path}")


def test_a_csv_error_names_the_line_of_the_file(tmp_path):
    """Line 1 is the header: the second data row is line 3, as an editor shows it."""
    path = tmp_path / "train.csv"
    path.write_text("text,label\nw1 w2,yes\nw3 w4,\nw5,no\n")
    with pytest.raises(DataError, match=r"train\.csv, line 3: the label cell of column 'label'"):
        load_classification(str(path))


def test_an_empty_target_cell_is_named_by_its_own_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"de": "ein Haus", "en": "a house"}, {"de": "ein Hund", "en": " "}]))
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: the text cell of column 'en' is empty"):
        load_parallel(str(path), source_lang="de", target_lang="en")


def test_a_small_text_file_still_holds_out_one_document(tmp_path):
    """Fewer than ten documents: a tenth rounds down to none, but the run evaluates on at least one."""
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(f"w{i} w{i + 1}" for i in range(5)))
    data = load_text(str(path))
    assert len(data.evals["heldout"]) == 1 and len(data.train) == 4
