"""One run per workdir: a second run is refused naming the holder; a dead holder's lock is
taken over with one line."""

import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from vqgan_jax import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys, time
from vqgan_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('held', flush=True)
  time.sleep(300)
"""


def test_second_run_is_refused_naming_the_holder_until_it_dies(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, workdir], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline() == 'held\n'
    t0 = time.perf_counter()
    proc = subprocess.run(
      [
        sys.executable,
        '-m',
        'vqgan_jax.main',
        '--config=configs/fashion_mnist_vqgan.py:smoke',
        f'--workdir={workdir}',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    [error] = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert error.startswith(f'error: workdir {workdir} is in use by pid {holder.pid} on host ')
    assert '-c' in error and error.endswith('; wait for it or stop it'), error
    # Refused before anything was computed: nothing written but the lock.
    assert os.listdir(workdir) == ['.lock'], os.listdir(workdir)
    print(f'refused in {elapsed:.1f} s')
  finally:
    holder.send_signal(signal.SIGKILL)  # Dies holding it: the kernel drops the lock.
    holder.wait()
    holder.stdout.close()
  with caplog.at_level(logging.WARNING), workdir_lock.hold(workdir):
    with open(os.path.join(workdir, '.lock')) as f:
      assert json.load(f)['pid'] == os.getpid()
  [line] = [r.getMessage() for r in caplog.records if r.name == workdir_lock.__name__]
  assert line.startswith(f'workdir {workdir}: stale lock from pid {holder.pid} on host ')
  # Released cleanly: the next run takes it without a word.
  caplog.clear()
  with caplog.at_level(logging.WARNING), workdir_lock.hold(workdir):
    pass
  assert not caplog.records


def test_without_flock_the_holder_file_decides(tmp_path, monkeypatch, caplog):
  """Some NFS mounts have no flock (mocked: this machine's filesystems all have it)."""

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(fcntl, 'flock', no_flock)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  lock = tmp_path / '.lock'
  for pid, refused in [(os.getppid(), True), (dead.pid, False)]:
    me = {'pid': pid, 'host': os.uname().nodename, 'started': 'then', 'command': 'python x'}
    lock.write_text(json.dumps(me))
    caplog.clear()
    if refused:
      with pytest.raises(workdir_lock.WorkdirError, match=f'in use by pid {pid} on host'):
        with workdir_lock.hold(str(tmp_path)):
          pass
    else:
      with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
        assert json.loads(lock.read_text())['pid'] == os.getpid()
      assert [r.getMessage() for r in caplog.records] == [
        f'workdir {tmp_path}: stale lock from pid {pid} on host {me["host"]} (started then, '
        'python x), no longer running, taken over'
      ]
      assert lock.read_text() == ''  # Released.
