"""Preemption: on SIGTERM, save a checkpoint at the current step and stop.

Spot/preemptible VMs, Cloud TPUs, Kubernetes and Slurm send SIGTERM some seconds before
they stop a process (30 s on GCE spot VMs). While training, `SigtermFlag` turns that
signal into a flag; the loop checks it between `run_steps` calls, saves with the run's
CheckpointManager at the step reached and raises `Preempted`. The same command then
resumes from that checkpoint, and the data continues at that exact step.

Python runs a signal handler only when the main thread is back in the interpreter, so
the flag is seen after the current `run_steps` call returns: `CallLength` keeps each
call to about `MAX_SECONDS_PER_CALL` seconds, whatever --log_every_steps is.

Multi-worker: the save is collective, so every worker must save at the same step. After
each call the workers exchange their flags (and the chief's next call length), so a
SIGTERM to any one worker makes all of them save together and stop.

`tf.distribute.experimental.PreemptionCheckpointHandler` is not used: on GCE TPU and CPU
VMs it does nothing; elsewhere it adds its own counter variable to the checkpoint,
restores on construction (bypassing `checkpoints.restore`'s checks) and counts calls
rather than steps.
"""

from __future__ import annotations

import signal
import threading
import types

from absl import logging
import tensorflow as tf

# The shell's status for "terminated by SIGTERM" (128 + 15), also what TensorFlow's
# handler uses on GCE for "restart me": not 0, so `run.py ... && next step` stops here.
EXIT_CODE = 128 + signal.SIGTERM
MAX_SECONDS_PER_CALL = 5.0


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint at `step` (on the chief: `path`)."""

    def __init__(self, message: str, step: int, path: str | None):
        super().__init__(message)
        self.step = step
        self.path = path


class SigtermFlag:
    """While entered, SIGTERM sets `received` instead of killing the process.

    The previous handler comes back on exit. Outside the main thread (where Python
    cannot install handlers) SIGTERM keeps its usual effect.
    """

    def __init__(self):
        self.received = False
        self._previous = None
        self._installed = False

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del signum, frame
        self.received = True

    def __enter__(self) -> "SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        else:
            logging.warning("Not in the main thread: a SIGTERM will not save a checkpoint first")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


class CallLength:
    """Steps per `run_steps` call so that one call lasts about `seconds`."""

    def __init__(self, seconds: float = MAX_SECONDS_PER_CALL):
        self.seconds = seconds
        self.steps = 1  # the first call also traces the function: measure before growing

    def update(self, steps: int, elapsed: float) -> int:
        self.steps = max(1, int(self.seconds * steps / max(elapsed, 1e-9)))
        return self.steps


class Agreement:
    """`agreement(received, next_steps)`: (any worker received SIGTERM, the chief's next call length).

    Without several workers these are the local values. With MultiWorkerMirroredStrategy
    it is one small gather across workers, so that all of them stop, and size their next
    call, alike; otherwise their collectives would no longer pair up.
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        self._chief = bool(strategy.extended.should_checkpoint)
        self._gather = None
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # A tf.function: run eagerly, the collective costs about a second.
            self._gather = tf.function(
                lambda local: strategy.gather(strategy.run(tf.identity, args=(local,)), axis=0)
            )

    def __call__(self, received: bool, next_steps: int) -> tuple[bool, int]:
        if self._gather is None:
            return received, next_steps
        # Non-chief workers offer a huge length, so the minimum is the chief's.
        local = tf.constant([[int(received), next_steps if self._chief else 2**62]], tf.int64)
        values = self._gather(local).numpy()  # (replicas, 2)
        return bool(values[:, 0].max()), int(values[:, 1].min())
