"""What the user did wrong, as exceptions the command line turns into one line and exit code 2.

Kept free of heavy imports so that `headprune --help` and input errors answer at once.
"""


class HeadpruneError(Exception):
    """A problem with the user's input or files: reported as one line, no traceback."""


class ConfigError(HeadpruneError, ValueError):
    """An option out of range or of the wrong type."""


class DataError(HeadpruneError, ValueError):
    """Data that cannot be read, or rows that cannot be used."""


class ModelError(HeadpruneError, ValueError):
    """A model that cannot be loaded or does not fit the task."""


class UnsupportedArchitectureError(HeadpruneError, ValueError):
    """A model whose attention layout headprune does not know."""


class CheckpointError(HeadpruneError, RuntimeError):
    """A checkpoint that cannot be read or belongs to other settings."""


class TrainingDivergedError(HeadpruneError, RuntimeError):
    """A loss, a weight or a head score that became NaN or infinite."""


class PrunedCheckpointError(HeadpruneError, ValueError):
    """A saved pruned model whose weights do not match its record."""


class OutputExistsError(HeadpruneError, FileExistsError):
    """An output folder that already holds results, or cannot be written."""


def first_line(err: Exception) -> str:
    """The headline of an exception from a library, for a one-line message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require(*modules: str, extra: str) -> None:
    """Refuse in one line, before any work, a command whose optional packages are missing."""
    from importlib.util import find_spec
    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise ConfigError(f"this needs {', '.join(missing)}: pip install 'headprune[{extra}]' "
                          f"(or pip install {' '.join(missing)})")
