"""Numerical bounds that say how close they came.

`check(name, measured, bound)` asserts `measured <= bound`. With $VQGAN_JAX_BOUNDS_LOG naming
a file, it and every `np.testing.assert_allclose` (wrapped by `record_allclose`, which
conftest installs then) append one JSON line per call: the call site, the test and
measured / bound. `experiments/test_bounds.py` runs the numerical test files under each CPU
kind XLA can emulate here and keeps the worst ratio per bound, so a bound that one CPU kind
barely meets shows before a machine of that kind fails it.
"""

import functools
import json
import os
import sys

import numpy as np

LOG = os.environ.get('VQGAN_JAX_BOUNDS_LOG')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(ratio: float, name: str = '', depth: int = 2) -> None:
  if not LOG:
    return
  frame = sys._getframe(depth)  # pylint: disable=protected-access
  # A helper that checks several leaves reports its caller's line too, so each test's use of
  # a shared helper counts as its own bound.
  site = os.path.relpath(frame.f_code.co_filename, _ROOT) + f':{frame.f_lineno}'
  if frame.f_back is not None and frame.f_back.f_code.co_filename == frame.f_code.co_filename:
    site += f' <- {frame.f_back.f_lineno}'
  test = os.environ.get('PYTEST_CURRENT_TEST', '').rsplit(' (', 1)[0]
  row = {'site': site, 'test': test, 'name': name, 'ratio': float(ratio)}
  with open(LOG, 'a') as f:  # one short line per write: workers append without interleaving
    f.write(json.dumps(row) + '\n')


def check(name: str, measured: float, bound: float) -> None:
  """assert measured <= bound, recording measured / bound."""
  _record(measured / bound if bound else float(measured > 0) * np.inf, name)
  assert measured <= bound, f'{name}: {measured:.3g} > bound {bound:.3g}'


def allclose_ratio(actual, desired, rtol=1e-7, atol=0.0) -> float | None:
  """max |actual - desired| / (atol + rtol |desired|): <= 1 where assert_allclose passes."""
  try:
    a = np.asarray(actual, np.float64)
    d = np.asarray(desired, np.float64)
    err = np.abs(a - d)
  except (TypeError, ValueError):
    return None
  both = np.isnan(a) & np.isnan(d)
  err = np.where(both, 0.0, err)
  tol = atol + rtol * np.abs(d)
  if err.size == 0:
    return 0.0
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = np.where(err == 0, 0.0, err / tol)
  return float(np.max(ratio))


def record_allclose() -> None:
  """Wraps np.testing.assert_allclose to record each call's ratio (only with LOG set)."""
  original = np.testing.assert_allclose

  @functools.wraps(original)
  def wrapped(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
    ratio = allclose_ratio(actual, desired, rtol, atol)
    if ratio is not None:
      _record(ratio, kwargs.get('err_msg', '') or '', depth=2)
    return original(actual, desired, rtol, atol, *args, **kwargs)

  np.testing.assert_allclose = wrapped


U32 = 2.0**-24  # float32's unit roundoff


def check_sums_close(name, got, want, magnitude, n, extra=1.0):
  """Two float32 evaluations of the same sums of n products (a conv, a matmul, a gradient)
  agree within 2 n u `magnitude`, elementwise: each is within Higham's gamma_n = n u of the
  exact sum times the sum of its terms' absolute values (`magnitude`: the same op on |operands|),
  whatever order or blocking a CPU's kernel sums in. `extra` widens it for algorithms that
  transform their terms first (Winograd). A wrong tap or coefficient is off by O(magnitude)."""
  err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  bound = extra * 2 * n * U32 * np.asarray(magnitude, np.float64) + np.finfo(np.float32).tiny
  check(f'{name} (of 2 n u |terms|, n = {n})', float(np.max(err / bound)), 1.0)
