"""The stop watchdog of a training run: SIGINT/SIGTERM ask for a checkpoint and a stop after the current step;
a second SIGINT aborts at once. `train.py` enters a `StopRequest` around its loop and reads `.signal`."""

from __future__ import annotations

import os
import sys
from pathlib import Path


class StopRequest:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT aborts at once.

    Python runs signal handlers only between bytecodes of the main thread, so a Ctrl-C that lands inside a
    long MLX computation waits for it, and two of them merge into one. Instead the signal's C handler writes
    each signal number to a pipe (`signal.set_wakeup_fd`), and a watchdog thread reads it: MLX releases the
    GIL while it computes, so the watchdog acts at once."""

    def __init__(self, out: Path):
        self.signal = None
        self.out = out
        self._previous = {}
        self._pipe = None
        self._old_wakeup = -1

    def __enter__(self):
        import signal
        import threading

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, lambda signum, frame: None)  # the watchdog decides
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread (or no pipes): leave signals alone
            self.__exit__()
            return self
        self._pipe = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True, name="mlx_dlm-signals").start()
        return self

    def _watch(self, read_fd: int) -> None:
        import signal

        while True:
            try:
                received = os.read(read_fd, 64)
            except OSError:
                return
            if not received:
                return
            for signum in received:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                if signum == signal.SIGINT and self.signal == "SIGINT":
                    print(f"Aborted by a second Ctrl-C; the last checkpoint in {self.out} is kept", file=sys.stderr,
                          flush=True)
                    os._exit(130)
                if self.signal is None:
                    self.signal = signal.Signals(signum).name
                    print(f"{self.signal}: stopping after this step and saving a checkpoint"
                          + (" (Ctrl-C again to abort now)" if signum == signal.SIGINT else ""),
                          file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in reversed(self._pipe):
                os.close(fd)
            self._pipe = None
        return False
