"""One run per workdir: every mode that writes into a workdir holds its lock, taken before
anything is computed.

Two runs in one workdir would write into the same temporary checkpoint directory and
interleave their rows in metrics.jsonl. The lock is `fcntl.flock` on `<workdir>/.lock`: the
kernel releases it when its holder dies, however it dies (kill -9 included), so it is never
stale. The file names its holder (pid, host, start, command) for the refusal and is emptied
on release; a name left in it is a holder that died holding it, and the run taking the lock
over says so in one line. Where flock is not supported (some NFS mounts) the file alone
decides: a holder on this host whose pid is gone is stale; one on another host cannot be
checked from here and counts as alive.

Several processes (one run on several hosts) share one workdir: process 0 alone takes it, and
its verdict reaches every process, so they all stop with the same sentence.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_FILE = '.lock'

_log = logging.getLogger(__name__)


class WorkdirError(RuntimeError):
  """The workdir is not writable, or another live run holds it."""


def _me() -> dict:
  argv = list(getattr(sys, 'orig_argv', sys.argv))
  argv[0] = os.path.basename(argv[0])
  command = ' '.join(' '.join(argv).split())  # One line, even for `python -c` scripts.
  return {
    'pid': os.getpid(),
    'host': socket.gethostname(),
    'started': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'command': command if len(command) <= 200 else command[:197] + '...',
  }


def _holder(fd: int) -> dict | None:
  """Who the file names: None when it is empty (released) or unreadable."""
  try:
    holder = json.loads(os.pread(fd, 1 << 16, 0) or b'null')
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
  return (
    f'pid {holder.get("pid")} on host {holder.get("host")} '
    f'(started {holder.get("started")}, {holder.get("command")})'
  )


def _alive(holder: dict) -> bool:
  if holder.get('host') != socket.gethostname():
    return True  # Cannot be checked from here.
  try:
    os.kill(int(holder.get('pid')), 0)
  except ProcessLookupError:
    return False
  except (OSError, TypeError, ValueError):
    return True  # E.g. another user's process (EPERM): it exists.
  return True


def _take(workdir: str, create: bool) -> int | None:
  """Locks `workdir`; returns the lock file's descriptor (None: no workdir to lock)."""
  if not create and not os.path.isdir(workdir):
    return None  # Nothing to write into: the mode says what is missing.
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(
      f'--workdir {workdir} is not writable ({e.strerror or e}); pick another directory'
    ) from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    flock = True
  except OSError as e:
    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      holder = _holder(fd)  # EWOULDBLOCK: held.
      os.close(fd)
      by = _describe(holder) if holder else 'another process'
      if holder and not _alive(holder):  # A child it forked inherited the lock.
        by, what = f'a process left over from {by}, which is no longer running', 'stop it'
      else:
        what = 'wait for it or stop it'
      raise WorkdirError(f'workdir {workdir} is in use by {by}; {what}') from None
    flock = False
  holder = _holder(fd)
  if holder and not flock and _alive(holder):
    os.close(fd)
    raise WorkdirError(
      f'workdir {workdir} is in use by {_describe(holder)}; wait for it or stop it (if it is '
      f'gone, delete {os.path.join(workdir, LOCK_FILE)}: this filesystem has no flock)'
    )
  if holder:
    _log.warning(
      'workdir %s: stale lock from %s, no longer running, taken over', workdir, _describe(holder)
    )
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_me()).encode(), 0)
  return fd


def _agree(error: str) -> str:
  """Process 0's `error` ('' when it took the lock), on every process (a collective)."""
  buf = np.zeros(2048, np.uint8)
  data = error.encode()[: buf.size]
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out).rstrip(b'\0').decode(errors='replace')


@contextlib.contextmanager
def hold(workdir: str, *, create: bool = True):
  """Holds the lock of `workdir` while the body runs (every process calls it: a collective).

  Args:
    workdir: the run's workdir (absolute).
    create: create a missing workdir; else a missing one is not locked (a mode that reads a
      run before it writes its results there says itself that the run is missing).

  Raises:
    WorkdirError: another live process holds it (one sentence naming it), or the workdir
      cannot be written.
  """
  fd, error = None, ''
  if jax.process_index() == 0:
    try:
      fd = _take(workdir, create)
    except WorkdirError as e:
      error = str(e)
  if jax.process_count() > 1:
    error = _agree(error)
  if error:
    raise WorkdirError(error)
  try:
    yield
  finally:
    if fd is not None:
      os.ftruncate(fd, 0)  # Released: no holder to report as stale.
      os.close(fd)  # Unlocks.
