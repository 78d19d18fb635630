"""One training run per model_dir: `<model_dir>/.lock` is held while a run trains.

Two runs in one model_dir would write `ckpt-N` in turn (a checkpoint's index and data
could then come from different runs) and both export. The lock file holds JSON
{host, pid, started, command, token}; a second training run stops at once with
`ModelDirInUseError`, which names the holder. Who holds it:
- only training modes (`--mode=eval` reads the checkpoints and may run alongside);
- in a multi-worker run only the chief (`distribute.writes_model_dir`);
- it is released at the end of the run, on an error and on SIGTERM (`Preempted`).

A holder that is gone (same host, its pid no longer runs: a crash or `kill -9`) is
taken over with a warning, so a crash never blocks the resume. A holder on another host
cannot be checked: the run refuses, and the message says to delete the file if that
run is gone.

Creation is atomic on local and network file systems (a hard link to a complete file,
or O_CREAT|O_EXCL where links are not supported). Object stores such as GCS
(`gs://...`) offer neither through tf.io.gfile: there the check and the write are two
steps, so two runs started within the same second may both go ahead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
from typing import Iterator
import uuid

from absl import logging
import tensorflow as tf

from simclr_tf.config import FlagError

LOCK_NAME = ".lock"


class ModelDirInUseError(FlagError):
    """Another training run holds the model_dir's lock."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # UTC, ISO 8601
    command: str
    token: str  # tells this acquisition from a later one by the same process

    @classmethod
    def me(cls) -> "Holder":
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            command=" ".join(sys.argv),
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started} (command: {self.command})"


# Lock paths this process holds, with their holder and nesting depth: `hold` is
# re-entrant so run.py can take the lock before writing flags.json and
# `train_and_evaluate` can take it again.
_held: dict[str, list] = {}


@contextlib.contextmanager
def hold(model_dir: str) -> Iterator[None]:
    """Holds `<model_dir>/.lock` for the duration; raises ModelDirInUseError if another run does."""
    path = lock_path(model_dir)
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    holder = acquire(model_dir)
    _held[path] = [holder, 1]
    try:
        yield
    finally:
        del _held[path]
        release(model_dir, holder)


def lock_path(model_dir: str) -> str:
    path = os.path.join(model_dir, LOCK_NAME)
    return path if _is_remote(path) else os.path.abspath(path)


def acquire(model_dir: str) -> Holder:
    """Creates the lock file, taking over one whose holder is gone."""
    path = lock_path(model_dir)
    tf.io.gfile.makedirs(model_dir)
    me = Holder.me()
    for _ in range(3):  # a gone holder's file is removed, then created again
        if _create(path, me):
            return me
        other = read_holder(path)
        if other is None:
            continue  # released in between
        if not is_gone(other):
            raise ModelDirInUseError(in_use_message(model_dir, path, other))
        logging.warning(
            "Taking over %s: its holder, %s, no longer runs (it crashed or was killed); "
            "this run resumes from the latest checkpoint.", path, other.describe(),
        )
        _remove_if_held_by(path, other)
    raise ModelDirInUseError(f"--model_dir={model_dir}: could not take {path}; another run keeps "
                             "taking it. Check which runs use this model_dir.")


def release(model_dir: str, holder: Holder) -> None:
    """Removes the lock file if it is still `holder`'s."""
    path = lock_path(model_dir)
    if not _remove_if_held_by(path, holder):
        logging.warning("%s was no longer held by this run; left it alone", path)


def read_holder(path: str) -> Holder | None:
    """The lock's holder; None if there is no lock file. Unreadable content gives a holder 'unknown'."""
    try:
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
    except tf.errors.NotFoundError:
        return None
    try:
        values = json.loads(text)
        return Holder(**{field.name: values[field.name] for field in dataclasses.fields(Holder)})
    except (ValueError, KeyError, TypeError):
        return Holder(host="unknown", pid=-1, started="unknown", command=f"unreadable lock {text[:80]!r}",
                      token="")


def is_gone(holder: Holder) -> bool:
    """True if `holder` surely no longer runs: on this host, and its pid is dead or is ours."""
    if holder.host != socket.gethostname() or holder.pid <= 0:
        return False  # another machine's processes cannot be checked from here
    if holder.pid == os.getpid():
        return True  # an earlier run in this process (or a reused pid in a new container)
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def in_use_message(model_dir: str, path: str, holder: Holder) -> str:
    unverifiable = (
        "" if holder.host == socket.gethostname()
        else f" This machine cannot check whether a process on {holder.host} still runs."
    )
    return (
        f"--model_dir={model_dir} is in use by another training run: {holder.describe()}. Two runs "
        f"in one model_dir would overwrite each other's checkpoints.{unverifiable} Wait for that run "
        "to end or pass another --model_dir; if that run is gone, delete "
        f"{path} and run again. (--mode=eval may run alongside.)"
    )


def _is_remote(path: str) -> bool:
    return "://" in path


def _create(path: str, holder: Holder) -> bool:
    """Creates the lock file holding `holder`; False if it exists."""
    text = json.dumps(dataclasses.asdict(holder), indent=2)
    if _is_remote(path):
        # Not atomic (see the module docstring).
        if tf.io.gfile.exists(path):
            return False
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return True
    # A hard link to a complete file: the lock appears with all its content at once.
    temp = f"{path}.{holder.token}"
    with open(temp, "w") as f:
        f.write(text)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system
        return _create_exclusive(path, text)
    finally:
        os.remove(temp)


def _create_exclusive(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _remove_if_held_by(path: str, holder: Holder) -> bool:
    current = read_holder(path)
    if current is None or current.token != holder.token:
        return False
    try:
        tf.io.gfile.remove(path)
    except tf.errors.NotFoundError:
        return False
    return True
