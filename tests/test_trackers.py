"""--report-to (issue 22): the training curves and the final metrics reach an experiment tracker
through Accelerate; tensorboard checked offline by reading its event files back."""
import struct

import pytest

from conftest import one_line_error, tiny
from headprune.recipes import prune


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TFRecord event files under `folder`: tag -> [(step, value)]."""
    from tensorboardX.proto import event_pb2
    found: dict = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):  # records: length (8 bytes), its crc (4), the event, its crc (4)
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_tensorboard_gets_the_training_curves_and_the_final_metrics(tiny_finetuned, tmp_path):
    results = prune(tiny(*tiny_finetuned, tmp_path, k=3, report_to="tensorboard"))
    logged = scalars(tmp_path / "tracker")
    history = [__import__("json").loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(step, round(loss, 5)) for step, loss in logged["prune/loss"]] == \
        [(row["step"], round(row["loss"], 5)) for row in history]
    assert "prune/temperature" in logged
    (split, value), = results["metrics_pruned"].items()
    assert logged[f"final/{split}"] == [(results["steps"], pytest.approx(value))]


def test_a_run_that_replaces_another_replaces_its_events_only_when_complete(tiny_finetuned, tmp_path, monkeypatch):
    import headprune.recipes as recipes
    first = prune(tiny(*tiny_finetuned, tmp_path, k=3, report_to="tensorboard"))
    events = sorted(p.relative_to(tmp_path) for p in (tmp_path / "tracker").rglob("events.out.tfevents.*"))
    monkeypatch.setattr(recipes, "_save_pruned", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped")))
    with pytest.raises(RuntimeError, match="stopped"):  # a new run that does not complete: the events stay
        prune(tiny(*tiny_finetuned, tmp_path, k=2, report_to="tensorboard", overwrite=True))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "tracker").rglob("events.out.tfevents.*")) == events
    monkeypatch.undo()
    second = prune(tiny(*tiny_finetuned, tmp_path, k=2, report_to="tensorboard", overwrite=True))
    logged = scalars(tmp_path / "tracker")  # one run's events, the second's
    (split, value), = second["metrics_pruned"].items()
    assert logged[f"final/{split}"] == [(second["steps"], pytest.approx(value))] and first["k"] == 3
    assert not (tmp_path / ".tracker.new").exists()
    prune(tiny(*tiny_finetuned, tmp_path, k=2, overwrite=True))  # without a tracker: the earlier events go
    assert not (tmp_path / "tracker").exists()


def test_a_run_started_afresh_does_not_add_to_a_stopped_run_s_events(tiny_finetuned, tmp_path):
    import shutil
    prune(tiny(*tiny_finetuned, tmp_path / "a", k=3, report_to="tensorboard"))
    (tmp_path / "b").mkdir()  # what a run stopped before its first checkpoint leaves: its events only
    shutil.copytree(tmp_path / "a" / "tracker", tmp_path / "b" / "tracker")
    results = prune(tiny(*tiny_finetuned, tmp_path / "b", k=2, report_to="tensorboard"))
    assert [p.name for p in (tmp_path / "b" / "tracker").iterdir()] == ["b"]  # run a's events (tracker/a) gone
    (split, value), = results["metrics_pruned"].items()
    assert scalars(tmp_path / "b" / "tracker")[f"final/{split}"] == [(results["steps"], pytest.approx(value))]


def test_a_tracker_without_its_package_is_refused_before_the_run(tiny_finetuned, tmp_path, capsys, monkeypatch):
    import accelerate.utils
    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)  # as on a machine without it
    line = one_line_error(capsys, ["prune", "--model", tiny_finetuned[0], "--dataset", tiny_finetuned[1], "--k", "3",
                                   "--report-to", "mlflow", "--output-dir", tmp_path / "run"])
    assert "--report-to mlflow needs mlflow: pip install mlflow" in line
    assert not (tmp_path / "run" / "results.json").exists()
