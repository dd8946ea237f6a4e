"""What a run leaves in its output folder, written so that nothing is lost.

Every file is written to a temporary name and moved into place, and every folder (the model, the
checkpoint) is written to a temporary folder and renamed into place: a kill leaves the old version
or the new one, never half of one. A folder that holds results, or a run's files with neither
results nor a checkpoint (nothing says a run made them), is refused unless the user asks to
overwrite; even then the earlier run stays whole until the new one is complete: a run writes its
final files in a stage folder and `finish_run` moves them in together, results.json last (a kill
during the move is completed at the next start). A run never writes inside
its own input, nor its input inside the run (`check_not_inside`), and never follows a symbolic
link out of its folder when it removes something. A folder that holds a checkpoint but no results
is resumed. The folder is checked for writing and free space before any data or model is loaded.
A run holds its folder while it runs (`hold_folder`): a second one started on it meanwhile is
refused before it touches anything.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from .errors import HeadpruneError, OutputExistsError

try:
    import fcntl
except ImportError:  # (Windows: folders are not held)
    fcntl = None

log = logging.getLogger("headprune")

RESULTS = "results.json"
LOCK = ".headprune.lock"  # held by the run writing in the folder (hold_folder)
CHECKPOINT = "checkpoint"  # a folder: state.json and tensors.safetensors
OLD_CHECKPOINT = "checkpoint.pt"  # a pickle written by headprune 0.1: never read
BEST = "best"  # with --select-by: the trainable weights of the best epoch so far
STAGE = ".run.new"  # a run's final files, moved into place together when it is complete
COMMIT = "commit.json"  # in the stage: the run is complete; the files it lists move into place
# What a finetune or prune run writes; a new run (--overwrite) removes the ones it did not write.
RUN_FILES = (RESULTS, "model", CHECKPOINT, BEST, "train_log.jsonl", "training.png", "heads.png",
             "head_scores.json", "report.md", "tracker")


def check_output_dir(path: Path, overwrite: bool, needed_bytes: int = 0) -> bool:
    """Refuse a folder holding results (unless overwrite: then check that the earlier run's files
    can be replaced, and leave them in place until the new run is complete); check that it can be
    written and has room; return True when there is a checkpoint to resume."""
    if (path / OLD_CHECKPOINT).exists():
        raise OutputExistsError(
            f"{path / OLD_CHECKPOINT} is a checkpoint of an older headprune (a pickle, which could "
            "run code, so it is not read); delete it to start over, or choose another --output-dir")
    if (path / RESULTS).exists():
        if not overwrite:
            raise OutputExistsError(f"{path} already holds results ({RESULTS}); choose another "
                                    "--output-dir or pass --overwrite")
        check_replaceable(path)
        log.info("%s holds an earlier run: it is replaced when this run is complete (--overwrite)", path)
    elif not overwrite and checkpoint_folder(path) is None:
        # what a run would replace, with neither results nor a checkpoint to say a run made it (the
        # logs, written from the first steps on, are a run's own and are replaced)
        found = [name for name in RUN_FILES if name not in ("train_log.jsonl", "training.png", "tracker")
                 and ((path / name).exists() or (path / name).is_symlink())]
        if found:
            raise OutputExistsError(f"{path} holds {', '.join(found)} but no results or checkpoint of a run: "
                                    "pass --overwrite to replace them, or choose another --output-dir")
    check_writable(path, needed_bytes)
    return checkpoint_folder(path) is not None


@contextmanager
def hold_folder(path: Path):
    """Hold `path` for one run, making it if needed: a second headprune started on it meanwhile (the
    same command twice, a job started again while the first still runs) is refused in one line
    before it touches anything (tidying up after a stopped run would discard this run's staged
    files). The lock is the system's (flock on `.headprune.lock`, removed at the end; one a killed
    run left is taken over): it goes when the process ends, however it ends. A folder left empty is
    removed where this run made it or was refused."""
    created = not path.exists()
    if fcntl is None:  # (no locks: the folder only)
        handle = None
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputExistsError(f"cannot write to the output folder {path}: {err.strerror or err}") from err
    else:
        handle = _locked(path)
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
    refused = False
    try:
        yield
    except HeadpruneError:
        refused = True
        raise
    finally:
        try:
            if handle is not None:  # (removed while still held: a run starting now makes a new one)
                (path / LOCK).unlink(missing_ok=True)
            if (created or refused) and not any(path.iterdir()):
                path.rmdir()
        except OSError:
            pass
        if handle is not None:
            handle.close()  # the lock goes with it


def _locked(path: Path):
    """The lock file of `path` (made, with the folder, where missing), open and locked by this process."""
    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle = open(path / LOCK, "a+", encoding="utf-8")
        except OSError as err:
            raise OutputExistsError(f"cannot write to the output folder {path}: {err.strerror or err}") from err
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.seek(0)
            holder = handle.read().strip() or "a process"
            handle.close()
            raise OutputExistsError(f"another headprune run ({holder}) is writing to {path}: wait for it to "
                                    "end, or choose another --output-dir") from err
        except OSError as err:  # a file system without locks (some network ones): the run goes on
            log.info("cannot lock %s (%s): a second run started there would not be refused", path, err.strerror or err)
            return handle
        try:  # the file still there, not one that a run ending just now removed (another may hold its successor)
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path / LOCK)):
                return handle
        except OSError:
            pass
        handle.close()


def check_not_inside(output: Path, inputs: dict[str, str | None], option: str = "--output-dir") -> None:
    """Refuse an output folder that is, or lies inside, one of the run's inputs, or that holds one
    of them: a run writes and (with --overwrite) removes files in its folder, and must never touch
    its own model or data. `inputs`: what the input is (for the message) -> its path, or None."""
    out = Path(output).resolve()
    for what, given in inputs.items():
        if not given or not Path(given).expanduser().exists():
            continue  # a hub id or a dataset name
        source = Path(given).expanduser().resolve()
        if out == source or source in out.parents or out in source.parents:
            raise OutputExistsError(f"the output folder {output} overlaps the {what} {given}: a run never "
                                    f"writes inside its own input; choose an {option} apart from it")


def check_replaceable(path: Path) -> None:
    """Before a run that will replace the earlier run in `path`: every file and folder of it can
    be removed (a symbolic link is removed as a link, never followed)."""
    for name in (*RUN_FILES, *(f".{n}.old" for n in RUN_FILES)):
        target = path / name
        if target.is_symlink() or not target.is_dir():
            continue
        for folder, _, _ in os.walk(target):  # does not follow links
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputExistsError(f"cannot replace the earlier run in {path}: {folder} is not "
                                        "writable; fix its permissions, or choose another --output-dir")


def remove_path(target: Path) -> None:
    """Remove a file, a symbolic link (the link itself, never what it points to) or a folder."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)


def stage_folder(path: Path) -> Path:
    """Where a run writes its final files (model, scores, plots, log, report) until `finish_run`
    moves them into place together: an earlier run's files stay whole until then, and a run stopped
    before leaves nothing that looks like a result (its next start discards the stage)."""
    stage = path / STAGE
    stage.mkdir(parents=True, exist_ok=True)
    return stage


def finish_run(path: Path, results: dict, in_place: tuple[str, ...] = ()) -> None:
    """Complete a run whose final files are staged: write its results.json and the commit record
    beside them (from then on the run counts as complete: a kill is completed at the next start),
    then move them into place. `in_place`: run files this run wrote in place (its tracker events)."""
    stage = stage_folder(path)
    write_json(stage / RESULTS, results)
    files = sorted(p.name for p in stage.iterdir() if not p.name.startswith(".") and p.name != RESULTS)
    write_json(stage / COMMIT, {"files": [*files, RESULTS], "in_place": list(in_place)})
    commit_staged(path)


def commit_staged(path: Path) -> bool:
    """Move a complete staged run into place, if there is one: the earlier results first (they never
    show beside new files), then every run file this run does not replace (an earlier run's, the
    checkpoint), then the new files, results.json last. Safe to repeat after a kill part-way.
    Returns whether there was one."""
    stage = path / STAGE
    if not (stage / COMMIT).is_file():
        return False
    record = json.loads((stage / COMMIT).read_text())
    keep = {*record["files"], *record["in_place"]}
    if (stage / RESULTS).exists():
        remove_path(path / RESULTS)
    for name in RUN_FILES:  # only a run's files: nothing else of the user's
        if name not in keep:
            remove_path(path / name)
        remove_path(path / f".{name}.old")
    for name in record["files"]:  # results.json is the last of them
        if (stage / name).exists() or (stage / name).is_symlink():
            remove_path(path / name)
            os.replace(stage / name, path / name)
    remove_path(stage)
    return True


def settle_stopped_run(path: Path) -> None:
    """Before a run starts in `path`: a run stopped while its files were moved into place is completed;
    the staged files of one stopped before are discarded (it resumes from its checkpoint, or starts
    again), as are temporary files of one killed while writing."""
    try:
        if commit_staged(path):
            log.info("%s: completed the run that was stopped while its files were moved into place", path)
        remove_path(path / STAGE)
        remove_leftovers(path)
    except OSError as err:
        raise OutputExistsError(f"cannot tidy the output folder {path} after a stopped run: "
                                f"{err.strerror or err}; fix its permissions, or choose another --output-dir") from err


def settle_held(path: Path) -> None:
    """`settle_stopped_run` on a folder this process does not hold yet (a sweep's run, a demo's
    phase): under its hold, so that a run writing in it now is refused, not tidied away."""
    with hold_folder(path):
        settle_stopped_run(path)


def cache_root() -> Path:
    """headprune's own cache: `$HEADPRUNE_CACHE`, else `$XDG_CACHE_HOME/headprune` (~/.cache)."""
    root = os.environ.get("HEADPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headprune"
    return Path(root)


def drop_oldest(folder: Path, keep: int, pattern: str = "*.safetensors", max_bytes: int | None = None) -> None:
    """Removes all but the `keep` most recently written entries of a cache folder, and the older ones
    beyond `max_bytes` in all (the newest always stays)."""
    entries = sorted(folder.glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True)
    total = 0
    for rank, entry in enumerate(entries):
        total += entry.stat().st_size
        if rank >= keep or (max_bytes is not None and rank > 0 and total > max_bytes):
            entry.unlink(missing_ok=True)


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists: the folder a new output would be made in."""
    return next(folder for folder in (path, *path.absolute().parents) if folder.exists())


def check_writable(path: Path, needed_bytes: int = 0) -> None:
    """Create `path` and write a probe file in it; check the disk has `needed_bytes` free."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as err:
        raise OutputExistsError(f"cannot write to the output folder {path}: "
                                f"{err.strerror or err}") from err
    free = shutil.disk_usage(path).free
    if needed_bytes and free < needed_bytes:
        raise OutputExistsError(f"the disk of {path} has {free / 2**20:.0f} MiB free; this run needs "
                                f"about {needed_bytes / 2**20:.0f} MiB (model and checkpoint)")


def remove_leftovers(path: Path) -> None:
    """Temporary files and folders of a run that was killed while writing."""
    for leftover in path.glob(".*.tmp"):
        remove_path(leftover)


def checkpoint_folder(path: Path) -> Path | None:
    """The checkpoint to resume from, if any (the previous one when a kill fell between the two
    renames of `atomic_folder`)."""
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        if (path / name / "state.json").is_file():
            return path / name
    return None


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_files(path: Path, companions: tuple[str, ...] = ()):
    """Yield a temporary folder beside `path` to write `path.name` into, with any files it refers
    to beside it (an ONNX graph's external weights, `<name>.data`); if the block succeeds they move
    beside `path`, the graph last, and `companions` of an earlier `path` that this one did not write
    go. Temporary folders of `path` that a killed writer left go first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        remove_path(leftover)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        written = sorted(tmp.iterdir(), key=lambda file: file.name == path.name)  # the graph last
        for file in written:
            os.chmod(file, 0o666 & ~_umask())
            os.replace(file, path.parent / file.name)
        for stale in set(companions) - {file.name for file in written}:  # (an earlier export's weights)
            if (path.parent / stale).is_file():
                (path.parent / stale).unlink()
    finally:
        remove_path(tmp)


@contextmanager
def atomic_folder(path: Path):
    """Yield a temporary folder beside `path`; rename it to `path` only if the block succeeds.
    An earlier `path` is moved aside first and removed last, so a kill at any moment leaves a
    complete folder (the new one, or the old one as `.<name>.old`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; and writers that go through a
        for file in tmp.rglob("*"):        # temporary file leave 0600 (transformers' weights)
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o666 & ~_umask())
        remove_path(old)
        if path.exists() or path.is_symlink():
            os.replace(path, old)  # a link is moved as a link
        os.replace(tmp, path)
        remove_path(old)
    finally:
        remove_path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def keep_json(path: Path, obj, unkept: str) -> bool:
    """A cache's record (compact JSON, written atomically); one that cannot be written only costs time:
    a warning says so, ending with `unkept` (what follows), and False."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(obj))
        return True
    except OSError as err:
        log.warning("cannot write %s (%s): %s", path, err.strerror or err, unkept)
        return False


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def folder_bytes(path) -> int:
    """Size of the weight files of a local model folder (0 for anything else)."""
    if path is None or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin"))


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("headprune", "torch", "transformers", "accelerate", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
