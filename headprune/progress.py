"""Progress of long work: a tqdm bar on a terminal; when standard error is a file or a pipe (a
log, CI, `nohup`), plain log lines at most once a minute instead of a bar's carriage-return frames."""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

log = logging.getLogger("headprune")

LINE_EVERY = 60.0  # seconds between two progress lines in a log


def on_terminal() -> bool:
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Off a terminal, silence the bars of datasets (tokenising) and transformers / the hub
    (loading weights): they are short and would flood a log. Call before importing them."""
    if not on_terminal():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class ProgressLines(tqdm):
    """A tqdm that draws nothing and logs its state as one line (count, time, rate, postfix) at
    most every LINE_EVERY seconds (whatever refreshes it: updates, set_postfix), and when it ends:
    always where it is left (`leave`), otherwise where no bar has logged for LINE_EVERY seconds (short
    bars in a row, such as evaluations, would leave a log silent for minutes)."""

    _logged_at = float("-inf")  # class defaults: tqdm draws once inside its own __init__
    _closing = False
    last_line_at = float("-inf")  # any bar's last line (the class's, shared)

    def __init__(self, *args, **kwargs):
        kwargs.update(file=_Discard(), mininterval=LINE_EVERY, dynamic_ncols=False,
                      bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        now = self._time()
        # not the first draw; a bar that leaves nothing (cleared with msg="") only after a silent minute
        ending = self._closing and (msg is None or now - ProgressLines.last_line_at >= LINE_EVERY)
        if self.n and (ending or (msg is None and now - self._logged_at >= LINE_EVERY)):
            self._logged_at = ProgressLines.last_line_at = now
            log.info("%s", self.format_meter(**self.format_dict))
        return True

    def close(self):
        self._closing = True
        super().close()


def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs) on a terminal, ProgressLines elsewhere."""
    return (tqdm if on_terminal() else ProgressLines)(iterable, **kwargs)
