"""headprune's caches (scores of scored methods, metrics of unpruned models) stay bounded: the
newest entries are kept."""
import json
import os

import headprune.digests as digests
from headprune.selection import drop_oldest


def test_the_scores_cache_keeps_the_newest_entries(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    (tmp_path / "not-an-entry.txt").write_text("kept")
    drop_oldest(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle.safetensors", "newest.safetensors", "not-an-entry.txt"]


def test_the_metrics_cache_keeps_the_newest_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(digests, "METRICS_KEPT", 2)
    for key in ("a", "b", "c"):
        digests.remember_metrics(key, {"accuracy": key})
    assert digests.cached_metrics("a") is None and digests.cached_metrics("c") == {"accuracy": "c"}
    digests.remember_metrics("b", {"accuracy": "b2"})  # written again: the newest now
    digests.remember_metrics("d", {"accuracy": "d"})
    assert list(json.loads((tmp_path / "unpruned-metrics.json").read_text())) == ["b", "d"]


def test_the_scores_key_changes_with_code_a_scorer_borrows(tmp_path, monkeypatch):
    """Fisher's gradients come from michel.py: a change there is a change of Fisher's scores."""
    from pathlib import Path

    from headprune.config import PruneConfig
    from headprune.methods import michel, scoring
    from headprune.selection import scores_key
    methods = tmp_path / "methods"
    methods.mkdir()
    for path in Path(scoring.__file__).parent.glob("*.py"):
        (methods / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(scoring, "__file__", str(methods / "scoring.py"))
    cfg = PruneConfig(model="some/folder", dataset="some.csv", method="fisher", k=2)
    before = scores_key(cfg, "weights-digest", [{"text": "a", "label": 0}])
    assert before == scores_key(cfg, "weights-digest", [{"text": "a", "label": 0}])
    (methods / Path(michel.__file__).name).write_text("# changed\n")
    assert scores_key(cfg, "weights-digest", [{"text": "a", "label": 0}]) != before
