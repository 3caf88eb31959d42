"""Progress bars and console output that suit where they go: a terminal, a log file, or one of several processes.

* :func:`progress_bar` is a ``tqdm`` bar on a terminal. When stderr is not a terminal (a log file, a
  pipe, CI) a live bar is a stream of carriage-return redraws that a log shows as one endless line or
  as hundreds of lines, so there it writes plain lines instead: the bar's state at most once a minute
  and once when it ends (a bar shorter than a minute is one line). It is off under ``-q``
  (``enabled=False``) and on every process of a ``torchrun`` launch but rank 0.
* :func:`is_main_process`: rank 0 of ``torchrun`` / ``accelerate launch``, or the only process.
* :func:`silence_library_bars` turns off the bars of transformers (``Loading weights``), huggingface_hub
  (downloads) and datasets, which take no such care.
* :func:`library_bars` makes a library's module-level ``tqdm`` name a :func:`progress_bar` for a while
  (lm-eval's request bars, transformers' GGUF de-quantizing bar).

This module imports nothing heavy; ``tqdm`` is imported when a bar is made.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys

LINE_INTERVAL_S = 60.0  # seconds between plain progress lines when stderr is not a terminal


def is_main_process() -> bool:
    """Whether this process should print: rank 0 of a distributed launch (``RANK``, set by torchrun and
    accelerate before the process starts), or a process that is not part of one."""
    return os.environ.get("RANK", "0") == "0"


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal (a closed stream or a stand-in without ``isatty`` is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@functools.cache
def _line_bar_class():
    from tqdm.std import tqdm

    class LineBar(tqdm):
        """A tqdm that writes whole lines: its state at most every ``mininterval`` seconds (however often
        it is redrawn: ``set_postfix`` redraws at once) and once at the end, never the starting count nor
        the same count twice.

        Made with ``leave=False``, so that ``close()`` asks to *clear* the bar (``display(msg="")``):
        that is where the final line is written, with no trailing carriage return or blank line.
        """

        def display(self, msg=None, pos=None):
            now, last = self._time(), getattr(self, "_line_n", None)
            if msg == "":  # closing
                write = self.n != last
            else:
                due = now - getattr(self, "_line_t", getattr(self, "start_t", now)) >= self.mininterval
                write = due and self.n != (self.initial if last is None else last)
            if write:
                self.fp.write(self.__str__() + "\n")
                self.fp.flush()
                self._line_n, self._line_t = self.n, now
            return False

    return LineBar


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)`` as the module docstring says: live on a terminal, plain lines otherwise,
    off when ``enabled`` is false (or ``disable=True`` is passed, as libraries do) and off the main process."""
    from tqdm.std import tqdm

    if kwargs.pop("disable", False) or not enabled or not is_main_process():
        return tqdm(iterable, disable=True, **kwargs)
    if is_terminal(kwargs.get("file") or sys.stderr):
        return tqdm(iterable, **kwargs)
    kwargs.update(mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S, leave=False, dynamic_ncols=False,
                  ascii=True, ncols=80)
    return _line_bar_class()(iterable, **kwargs)


def silence_library_bars() -> None:
    """Turn off the progress bars of transformers, huggingface_hub and datasets (for ``-q``, a log file, or a
    process other than the main one)."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is first imported
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars, and huggingface_hub's
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


@contextlib.contextmanager
def library_bars(modules: list[str], *, enabled: bool = True):
    """For the duration, the ``tqdm`` name of each of ``modules`` (imported here) makes :func:`progress_bar`\\ s."""
    patched = []
    try:
        for name in modules:
            module = importlib.import_module(name)
            patched.append((module, module.tqdm))
            module.tqdm = functools.partial(progress_bar, enabled=enabled)
        yield
    finally:
        for module, original in reversed(patched):
            module.tqdm = original
