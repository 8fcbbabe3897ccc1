"""Stop requests for the training loop: SIGTERM (preemption) and Ctrl-C (SIGINT) both save first.

The handlers only set a flag (they must not touch JAX); the loop polls it between steps, saves a
checkpoint at the next step boundary and returns normally. The first Ctrl-C also hands SIGINT back to
the operating system's default action, so a second Ctrl-C ends the process at once, without saving
(even in the middle of a compilation; the newest finished checkpoint stays the one to resume from).
A signal only reaches Python between bytecodes: the first Ctrl-C during a long compilation is seen
when it returns.
"""

import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Set by SIGTERM or the first SIGINT; `signal_name` says which ("SIGTERM" / "SIGINT")."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C: the OS ends the process
      print("\nCtrl-C: saving a checkpoint at the end of this step, then exiting (Ctrl-C again to exit "
            "at once without saving)", file=sys.stderr, flush=True)
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name

  def uninstall(self) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must save the same step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
