"""SIGTERM (preemption) turned into a flag the train loop polls between steps.

The loop then saves a checkpoint at the current step, waits for it and
returns normally, so the process exits 0 and a restart resumes from there.
"""
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class SigtermFlag:
  """Context manager: while active, SIGTERM sets the flag instead of killing."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    else:  # Signal handlers can only be installed by the main thread.
      logging.warning('Not in the main thread: SIGTERM will not be caught.')
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: will save a checkpoint and stop.')
    self._event.set()

  def is_set(self) -> bool:
    """True once any process got SIGTERM (all processes agree, so they stop
    at the same step and save the same checkpoint together)."""
    flag = self._event.is_set()
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag
