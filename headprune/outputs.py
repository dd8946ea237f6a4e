"""What a run leaves in its output folder, written so that nothing is lost.

Every file is written to a temporary name and moved into place (a kill leaves the old file or the
new one, never half of one); a folder that holds results is refused unless the user asks to
overwrite; a folder that holds a checkpoint but no results is resumed.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(path: Path, overwrite: bool) -> bool:
    """Refuse a folder holding results (unless overwrite); return True when there is a checkpoint
    to resume from."""
    if (path / RESULTS).exists() and not overwrite:
        raise OutputExistsError(f"{path} already holds results ({RESULTS}); choose another "
                                "--output-dir or pass --overwrite")
    return (path / CHECKPOINT).exists() and not (path / RESULTS).exists()


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_torch(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("headprune", "torch", "transformers", "accelerate", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
