"""Ending a trainer process (a worker or the launcher) without the interpreter's teardown.

Once torch, timm and torchvision are loaded, Python's own shutdown (freeing every module and what it holds) costs
2-3 CPU seconds per process on the development VM, after all the work is done, and a torchrun job pays it in
every worker and in the launcher (docs/benchmarks.md, "make demo against timm"). ``exit_process`` keeps what
that shutdown does that anyone can observe, in the same order: it waits for non-daemon threads, runs the atexit
handlers (logging's flush, multiprocessing's reaping of its children), flushes the standard streams, and then
ends the process with ``os._exit``. Only the freeing of memory the kernel reclaims anyway is skipped.

Only the ``__main__`` entry points call it; ``main()`` functions return their exit code, so tests that call
them in-process keep their interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what the interpreter runs at exit; registered by logging, multiprocessing, torch
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach the reader anyway
            stream.flush()
    os._exit(code)
