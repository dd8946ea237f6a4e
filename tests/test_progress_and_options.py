"""Progress off a terminal is a few plain lines; the options the second hardening round added or
mended: the reference's relaxation one flag away, help that says what a command does, cells that
are not text named as such."""
import json
import logging
import subprocess
import sys

import pytest
import torch

import headprune.progress as progress
from headprune.cli import parser
from headprune.config import PruneConfig
from headprune.data import load_classification
from headprune.errors import ConfigError, DataError
from headprune.methods import DSPSelector, soft_top_k
from headprune.methods.dsp import sample_gumbel
from headprune.parallel import load_parallel
from headprune.randomness import generator


def test_progress_off_a_terminal_is_log_lines_without_carriage_returns(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    run = subprocess.run([sys.executable, "-m", "headprune.cli", "prune", "--model", str(model), "--dataset", str(data),
                          "--k", "3", "--batch-size", "16", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    assert "headprune: dsp pipelined: 9/9 [" in run.stderr  # the bar's last state, as one line


def test_progress_lines_come_at_most_every_interval(caplog, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    now = [0]
    with caplog.at_level(logging.INFO, logger="headprune"):
        bar = progress.progress_bar(total=12, desc="work")
        bar._time, bar.start_t, bar.last_print_t = (lambda: now[0]), 0, 0
        for _ in range(12):
            now[0] += 25  # 25 s a step: a line at most every 60 s, whatever refreshes the bar
            bar.update()
            bar.set_postfix(loss=1.0)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" [")[0] for line in lines] == ["work: 1/12", "work: 4/12", "work: 7/12", "work: 10/12",
                                                       "work: 12/12"]
    assert lines[-1] == "work: 12/12 [05:00<00:00, 25.00s/it, loss=1]"


def test_short_bars_in_a_row_leave_a_line_once_a_minute(caplog, monkeypatch):
    """Bars that leave nothing (evaluations: under a minute each) log their end when no line came
    for a minute, so that a log is not silent for minutes between them."""
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress.ProgressLines, "last_line_at", float("-inf"))
    now = [0]
    with caplog.at_level(logging.INFO, logger="headprune"):
        for name in "abcd":
            bar = progress.progress_bar(range(3), desc=name, leave=False)
            bar._time, bar.start_t, bar.last_print_t = (lambda: now[0]), now[0], now[0]
            for _ in bar:
                now[0] += 15  # 45 s a bar
    assert [r.getMessage().split(" [")[0] for r in caplog.records] == ["a: 3/3", "c: 3/3"]


def test_logs_hold_no_terminal_colour_codes(tmp_path):
    """transformers colours its load report's title even in a log file: the command line's handlers,
    transformers' own among them, write it plain."""
    from headprune import cli
    assert cli.main(["measure", "--pruned", str(tmp_path / "nowhere")]) == 2  # (a command that stops early)
    handler = logging.getLogger("transformers").handlers[0]
    record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                               "\x1b[1mBertForSequenceClassification LOAD REPORT\x1b[0m from: m", None, None)
    assert handler.filter(record) and record.getMessage() == "BertForSequenceClassification LOAD REPORT from: m"


def test_the_references_relaxation_is_one_flag_away():
    k, n = 10, 12  # keeping 10 of 12: 2 rounds (dropping 2) by default, 10 in the reference
    default = DSPSelector(n, k, t0=1.0, tf=1.0, seed=3).train()
    reference = DSPSelector(n, k, t0=1.0, tf=1.0, seed=3, k_rounds=True).train()
    noise = sample_gumbel(default.logits, generator("cpu", 3, "gumbel", 0))
    scores = (default.logits + noise).detach()
    assert torch.allclose(default().detach(), soft_top_k(scores, k, 1.0, fewest_rounds=True))
    assert torch.allclose(reference().detach(), soft_top_k(scores, k, 1.0, fewest_rounds=False))
    assert not torch.allclose(default().detach(), reference().detach())
    assert torch.equal(default.eval()(), reference.eval()())  # the same heads are kept
    assert PruneConfig(schedule="reference", relaxation="k-rounds").relaxation == "k-rounds"
    with pytest.raises(ConfigError, match="--relaxation is DSP's"):
        PruneConfig(method="ste", relaxation="k-rounds")


def test_help_says_what_finetune_trains():
    text = " ".join(parser().format_help().split())
    assert "a classifier" not in text and "fine-tune (or train from scratch) a model for the task" in text


def test_a_number_in_a_text_column_is_named_as_what_it_is(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": 42, "label": 0}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: the text cell of column 'text' holds 42, not text"):
        load_classification(str(tmp_path / "d.jsonl"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"de": "hallo", "en": ["hello"]}) + "\n")
    with pytest.raises(DataError, match=r"the text cell of column 'en' holds \[\"hello\"\], not text"):
        load_parallel(str(tmp_path / "p.jsonl"))
