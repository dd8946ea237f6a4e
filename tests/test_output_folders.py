"""A run never writes inside its own input, replaces an earlier run only once the new one is
complete, and never follows a symbolic link out of its folder."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import one_line_error, tiny

import headprune.outputs as outputs
import headprune.recipes as recipes
import headprune.selection as selection
import headprune.tasks.classification as classification_task
from headprune.errors import OutputExistsError
from headprune.recipes import prune




def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tiny_finetuned, tmp_path):
    """A copy of the fine-tuning run (results.json and model/), to be harmed."""
    model, data = tiny_finetuned
    shutil.copytree(model.parent, tmp_path / "ft")
    return tmp_path / "ft", data


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("data or model was loaded before the input was checked")
    monkeypatch.setattr(classification_task, "load_classification", fail)


# -- 1. never inside the input -----------------------------------------------------------------------

def test_pruning_a_model_into_the_run_that_holds_it_is_refused_and_deletes_nothing(finished, capsys, no_loading):
    ft, data = finished
    before = snapshot(ft)
    line = one_line_error(capsys, ["prune", "--model", ft / "model", "--dataset", data, "--k", 3, "--output-dir", ft,
                                   "--overwrite"])
    assert f"the output folder {ft} overlaps the input model {ft / 'model'}" in line
    assert snapshot(ft) == before


@pytest.mark.parametrize("where", ["the model itself", "inside the model", "holding the data"])
def test_every_overlap_of_output_and_input_is_refused(finished, tmp_path, where, no_loading):
    ft, data = finished
    shutil.copy(data, ft / "data.jsonl")
    out = {"the model itself": ft / "model", "inside the model": ft / "model" / "run",
           "holding the data": ft}[where]
    model = ft / "model" if where != "holding the data" else tmp_path / "elsewhere"
    if where == "holding the data":
        shutil.copytree(ft / "model", model)
    before = snapshot(ft)
    with pytest.raises(OutputExistsError, match="overlaps the (input model|dataset)"):
        prune(tiny(model, ft / "data.jsonl", out, overwrite=True))
    assert snapshot(ft) == before and not (ft / "model" / "run").exists()


def test_measure_never_writes_into_the_model_it_measures(finished, capsys):
    ft, _ = finished
    line = one_line_error(capsys, ["measure", "--pruned", ft / "model", "--output-dir", ft / "model"])
    assert "overlaps the pruned model" in line and not (ft / "model" / "measure.json").exists()


# -- 2. --overwrite replaces the earlier run only when the new one is complete ---------------------------

def test_a_new_run_that_fails_leaves_the_earlier_run_whole(tiny_finetuned, tmp_path, monkeypatch):
    model, data = tiny_finetuned
    prune(tiny(model, data, tmp_path, method="dsp"))
    before = snapshot(tmp_path)
    monkeypatch.setattr(selection, "random_mask", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("failed")))
    with pytest.raises(RuntimeError, match="failed"):
        prune(tiny(model, data, tmp_path, method="random", overwrite=True))
    assert snapshot(tmp_path) == before


class Killed(BaseException):
    """A kill at that point (no handler catches it)."""


def visible(folder):
    return {name: data for name, data in snapshot(folder).items() if not name.startswith(outputs.STAGE)}


@pytest.mark.parametrize("earlier", [False, True])
def test_a_run_stopped_before_its_files_are_in_place_leaves_none_of_them_and_runs_again(
        tiny_finetuned, tmp_path, monkeypatch, earlier):
    """Its model, scores, plots and report wait in the stage: an earlier run stays whole, and the same
    command runs again (a scored method has no checkpoint: its model alone used to block the rerun)."""
    model, data = tiny_finetuned
    if earlier:
        prune(tiny(model, data, tmp_path, method="random"))
    before = visible(tmp_path)
    real_finish = recipes.finish_run

    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(recipes, "finish_run", killed)
    with pytest.raises(Killed):
        prune(tiny(model, data, tmp_path, method="flap", overwrite=earlier))
    assert visible(tmp_path) == before
    assert {"model", "head_scores.json", "heads.png", "report.md"} <= {p.name for p in (tmp_path / outputs.STAGE).iterdir()}
    monkeypatch.setattr(recipes, "finish_run", real_finish)
    results = prune(tiny(model, data, tmp_path, method="flap", overwrite=earlier))
    assert json.loads((tmp_path / "results.json").read_text())["method"] == results["method"] == "flap"
    assert not (tmp_path / outputs.STAGE).exists()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["headprune"]["method"] == "flap"


def test_a_kill_while_the_files_move_in_is_completed_at_the_next_start(tiny_finetuned, tmp_path, monkeypatch):
    """results.json is the last file in: a kill before it leaves the run to be completed, its report
    included and its checkpoint gone, not a run that looks finished without them."""
    model, data = tiny_finetuned
    whole = prune(tiny(model, data, tmp_path / "whole", checkpoint_every=2))
    moves, real_replace = [], outputs.os.replace

    def replace_then_die(source, target):  # the third of the staged files to move in: killed
        if Path(source).parent.name == outputs.STAGE != Path(target).parent.name:
            if len(moves) == 2:
                raise Killed
            moves.append(target)
        real_replace(source, target)
    monkeypatch.setattr(outputs.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        prune(tiny(model, data, tmp_path / "killed", checkpoint_every=2))
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    killed = tmp_path / "killed"
    assert not (killed / "results.json").exists() and not (killed / "checkpoint").exists()
    outputs.settle_stopped_run(killed)  # what the next command in this folder does first
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert json.loads((killed / "results.json").read_text())["kept_heads"] == [list(h) for h in whole["kept_heads"]]
    assert (killed / "report.md").is_file() and (killed / "training.png").is_file()


def test_an_earlier_run_that_cannot_be_replaced_is_refused_before_anything_is_touched(
        tiny_finetuned, tmp_path, monkeypatch, no_loading):
    model, data = tiny_finetuned
    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "model" / "sub" / "w").write_text("weights")
    (tmp_path / "results.json").write_text("{}")
    before = snapshot(tmp_path)
    locked = str(tmp_path / "model" / "sub")  # tests run as root, for whom every folder is writable
    real_access = outputs.os.access
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: path != locked and real_access(path, mode))
    with pytest.raises(OutputExistsError, match=f"cannot replace the earlier run in {tmp_path}: {locked} is not writable"):
        prune(tiny(model, data, tmp_path, overwrite=True))
    assert snapshot(tmp_path) == before


def test_links_in_an_earlier_run_are_replaced_never_followed(tiny_finetuned, tmp_path):
    model, data = tiny_finetuned
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    prune(tiny(model, data, out, method="random"))
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    shutil.rmtree(out / "model")
    (out / "model").symlink_to(elsewhere, target_is_directory=True)
    (out / "train_log.jsonl").symlink_to(elsewhere / "precious.txt")  # stale: the new run writes no log
    results = prune(tiny(model, data, out, method="random", overwrite=True, seed=1))
    assert (elsewhere / "precious.txt").read_text() == "keep me" and sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]
    assert not (out / "model").is_symlink() and (out / "model" / "config.json").is_file()
    assert not (out / "train_log.jsonl").exists() and not (out / "train_log.jsonl").is_symlink()
    assert json.loads((out / "results.json").read_text())["seed"] == results["seed"] == 1


# -- 3. an empty output folder name -------------------------------------------------------------------

def test_an_empty_output_folder_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "output_dir: empty" in one_line_error(capsys, ["prune", "--output-dir", ""])
    (tmp_path / "c.yaml").write_text("output_dir:\n")
    assert "output_dir: needs a value" in one_line_error(capsys, ["finetune", "--config", tmp_path / "c.yaml"])
    assert list(tmp_path.iterdir()) == [tmp_path / "c.yaml"]


def test_a_folder_with_a_model_but_no_run_to_resume_is_refused_unless_overwritten(tiny_finetuned, tmp_path, capsys,
                                                                                no_loading):
    """Without results or a checkpoint the files are not known to be a run's: the user's own are kept."""
    model, data = tiny_finetuned
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.txt").write_text("mine")
    (out / "notes.txt").write_text("notes")
    line = one_line_error(capsys, ["prune", "--model", model, "--dataset", data, "--k", 3, "--output-dir", out])
    assert line.endswith(f"{out} holds model but no results or checkpoint of a run: pass --overwrite to replace "
                         "them, or choose another --output-dir")
    assert snapshot(out) == {"model/mine.txt": b"mine", "notes.txt": b"notes"}
    (out / "model" / "mine.txt").unlink()
    (out / "model").rmdir()
    (out / "train_log.jsonl").write_text("{}\n")  # a run killed before its first checkpoint: started over
    assert outputs.check_output_dir(out, overwrite=False) is False
    (out / "heads.png").write_text("")
    assert outputs.check_output_dir(out, overwrite=True) is False


def test_a_saved_folder_has_the_permissions_open_would_give(tmp_path):
    """transformers writes the weights through a temporary file (mode 0600): others could not read them."""
    import os
    import stat
    umask = os.umask(0)
    os.umask(umask)
    with outputs.atomic_folder(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        os.chmod(tmp / "model.safetensors", 0o600)
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


def test_a_stopped_runs_staged_files_are_discarded_and_never_join_the_next_run(tmp_path):
    """A run stopped before its commit leaves files in the stage; the next start discards them, so that the
    next run's finish_run does not move a stopped run's scores or plots in beside its own."""
    stage = tmp_path / outputs.STAGE
    stage.mkdir()
    (stage / "head_scores.json").write_text("{}")  # the stopped run's, which the next run does not write
    outputs.settle_stopped_run(tmp_path)
    assert not stage.exists()
    new = outputs.stage_folder(tmp_path)
    (new / "report.md").write_text("the new run")
    outputs.finish_run(tmp_path, {"method": "random"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]


def test_a_failed_atomic_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    target = tmp_path / "results.json"
    with pytest.raises(RuntimeError):
        with outputs.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed while writing")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_saved_again_leaves_no_copy_of_the_earlier_one(tmp_path):
    """atomic_folder moves the earlier folder aside and removes it once the new one is in place (a
    checkpoint written every N steps must not leave a second one behind)."""
    for version in ("first", "second"):
        with outputs.atomic_folder(tmp_path / "checkpoint") as tmp:
            (tmp / "state.json").write_text(version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (tmp_path / "checkpoint" / "state.json").read_text() == "second"


# -- a folder another run is writing in ---------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from headprune.outputs import hold_folder
with hold_folder(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_run_started_on_a_folder_another_run_holds_is_refused_before_it_touches_anything(
        tiny_finetuned, tmp_path, capsys, no_loading):
    """The same command twice (or a job started again while the first still runs): the second would
    tidy the first's staged files away as a stopped run's. It is refused in one line, naming the
    process, and the folder stays as the first run has it; once that run ends, it is free."""
    import subprocess
    import sys
    model, data = tiny_finetuned
    out = tmp_path / "run"
    (out / outputs.STAGE).mkdir(parents=True)  # the first run's staged files
    (out / outputs.STAGE / "head_scores.json").write_text("[]")
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        before = snapshot(out)
        line = one_line_error(capsys, ["prune", "--model", model, "--dataset", data, "--k", "3", "--output-dir", out])
        assert line.startswith(f"headprune: error: another headprune run (process {first.pid} on ")
        assert line.endswith(f"is writing to {out}: wait for it to end, or choose another --output-dir")
        assert snapshot(out) == before
        line = one_line_error(capsys, ["sweep", "--model", model, "--dataset", data, "--ks", "3", "--methods",
                                       "random", "--output-dir", out])
        assert "another headprune run" in line and snapshot(out) == before
    finally:
        first.kill()
        first.wait()
    with outputs.hold_folder(out):  # a killed holder's lock goes with its process
        assert (out / outputs.LOCK).read_text().startswith("process ")
    assert sorted(p.name for p in out.iterdir()) == [outputs.STAGE]  # the lock file goes at the end


def test_a_held_folder_is_removed_only_where_the_run_made_it_or_was_refused(tmp_path):
    made = tmp_path / "made"
    with outputs.hold_folder(made):
        assert made.is_dir()
    assert not made.exists()  # made and left empty
    given = tmp_path / "given"
    given.mkdir()
    with outputs.hold_folder(given):
        pass
    assert given.is_dir() and not any(given.iterdir())  # the user's own empty folder stays
    with pytest.raises(OutputExistsError):
        with outputs.hold_folder(given):
            raise OutputExistsError("refused")
    assert not given.exists()  # a refused run leaves no empty folder, as before
    with outputs.hold_folder(made):
        (made / "results.json").write_text("{}")
    assert [p.name for p in made.iterdir()] == ["results.json"]


def test_a_lock_file_that_a_run_ending_removed_is_not_taken_for_the_folders(tmp_path, monkeypatch):
    """B opens the lock file just before A, ending, removes it; C then makes a new one and holds it.
    B's lock on the removed file holds nothing: B must see that and be refused by C's."""
    out = tmp_path / "run"
    with outputs.hold_folder(out):  # A
        removed = open(out / outputs.LOCK, "a+", encoding="utf-8")  # B's, opened just before A ends
        (out / "results.json").write_text("{}")
    with outputs.hold_folder(out):  # C
        opened = []

        def b_opens(*args, **kwargs):
            opened.append(args[0])
            return removed if len(opened) == 1 else open(*args, **kwargs)
        monkeypatch.setattr(outputs, "open", b_opens, raising=False)
        with pytest.raises(OutputExistsError, match="another headprune run .* is writing to"):
            with outputs.hold_folder(out):  # B
                pass
        assert len(opened) == 2  # the removed file, then the one C holds


def test_a_demo_does_not_tidy_a_phase_another_run_is_writing_in(tmp_path):
    import subprocess
    import sys
    phase = tmp_path / "demo" / "finetune"
    (phase / outputs.STAGE).mkdir(parents=True)  # the running fine-tuning's staged files
    (phase / outputs.STAGE / "train_log.jsonl").write_text("")
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(phase)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        before = snapshot(phase)
        with pytest.raises(OutputExistsError, match="another headprune run"):
            recipes.demo(tmp_path / "demo")
        assert snapshot(phase) == before
    finally:
        first.kill()
        first.wait()
