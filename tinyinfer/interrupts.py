"""Ctrl-C at a safe point: let a unit of work finish before the KeyboardInterrupt is raised.

An engine step half done leaves sequences whose caches count tokens that were never sampled,
and a parallel group's driver that left a command half done would leave the other devices
waiting in it. So the engine's step and the driver's commands run inside `defer_interrupts`:
Ctrl-C during one is raised when it ends. Ctrl-C in a chat then stops the answer after the
current step, and the model (and its devices) carry on.
"""

import signal
import threading
from contextlib import contextmanager


_deferring = False  # the main thread is inside defer_interrupts (the outermost one raises)


@contextmanager
def defer_interrupts():
    """Run the block to its end, then raise KeyboardInterrupt if Ctrl-C came during it. Nested
    blocks leave it to the outermost. (Only the main thread receives signals; elsewhere this
    does nothing.)"""
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt
