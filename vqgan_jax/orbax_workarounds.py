"""What orbax-checkpoint (0.12.8) does at exit and around a failure that `checkpoints` works
around, each kept because the test named with it fails without it (re-run those tests when
orbax is upgraded, and delete what they no longer need):

- a save still in flight when the interpreter exits is committed by an exit hook on
  `threading`'s private `_register_atexit`: from `atexit`, which runs later, orbax's threads
  fail with "cannot schedule new futures after interpreter shutdown", and without a hook the
  interpreter hangs on them (past the test's 90 s) or leaves the step's temporary directory
  (test_exit_with_a_save_in_flight_is_quiet);
- a failed save is logged with its traceback by each orbax thread it passes through, which
  `Checkpointer` raises as one sentence: an absl log filter drops those records while a writer
  is open (test_failed_save_is_one_sentence_and_leaves_no_temporary);
- a failed read or write closes orbax's event loop with the other reads suspended and the other
  writes in flight, which Python then reports as unraisable exceptions with TensorStore's JSON
  spec: `sys.unraisablehook` is wrapped to drop exactly those (the same test, intermittently;
  test_unreadable_latest_step_falls_back_to_the_newest_whole_one under
  `-W error::pytest.PytestUnraisableExceptionWarning`);
- after a failed save, asyncio logs "Future exception was never retrieved" with a traceback for
  each write orbax abandoned, as those futures are collected (often at exit, after the one
  error line): `save_failed` drops exactly those records from then on
  (test_full_disk_at_a_save_keeps_the_committed_checkpoints, in 2 runs of 3).
"""

import concurrent.futures.thread  # noqa: F401  Registers the pool shutdown our hook precedes.
import logging
import os
import sys
import threading

_log = logging.getLogger(__name__)

# Open writers (Checkpointers that save), by id: closed at exit if still open.
_OPEN: dict = {}

_SAVE_FAILURE_REPORTS = (
  '_SignalingThread.run() raised',
  'Handler Commit operations',
  'Finalize thread (',
)


def _drop_save_failure_reports(record: logging.LogRecord) -> bool:
  return not (isinstance(record.msg, str) and any(p in record.msg for p in _SAVE_FAILURE_REPORTS))


def writer_opened(writer) -> None:
  """From now until `writer_closed(writer)`: `writer.close()` runs at exit, and orbax's reports
  of a failed save are dropped."""
  drop_orbax_aftermath()  # Before a save can fail: orbax reports it from its threads.
  logging.getLogger('absl').addFilter(_drop_save_failure_reports)  # orbax logs through absl.
  _OPEN[id(writer)] = writer


def writer_closed(writer) -> None:
  _OPEN.pop(id(writer), None)
  if not _OPEN:
    logging.getLogger('absl').removeFilter(_drop_save_failure_reports)


def _close_open() -> None:
  # threading's exit hooks run newest first, so this one runs before the pools' shutdown that
  # the import of concurrent.futures.thread above registered.
  for writer in list(_OPEN.values()):
    try:
      writer.close()
    except Exception as e:  # pylint: disable=broad-except
      _log.error('%r failed to close at exit: %s', getattr(writer, 'workdir', writer), e)


threading._register_atexit(_close_open)  # pylint: disable=protected-access


def _drop_abandoned_writes(record: logging.LogRecord) -> bool:
  # asyncio's message for a Future or a Task: '<class> exception was never retrieved'.
  first = record.msg.split('\n', 1)[0] if isinstance(record.msg, str) else ''
  return not first.endswith('exception was never retrieved')


def save_failed() -> None:
  """A save failed and was raised as one sentence: the futures of its other writes, which
  orbax leaves unretrieved, are collected without asyncio's reports (for the process's life:
  they may be collected at exit)."""
  logger = logging.getLogger('asyncio')
  if _drop_abandoned_writes not in logger.filters:
    logger.addFilter(_drop_abandoned_writes)


def _is_orbax_aftermath(unraisable) -> bool:
  """Reads left suspended (reported as each coroutine is collected), or writes in flight whose
  TensorStore callbacks find orbax's event loop closed."""
  code = getattr(unraisable.object, 'cr_code', None)
  if code is not None:
    return f'{os.sep}orbax{os.sep}' in code.co_filename and isinstance(
      getattr(unraisable.exc_value, '__cause__', None), GeneratorExit
    )
  tb = unraisable.exc_traceback
  while tb is not None and tb.tb_frame.f_code.co_name != 'call_soon_threadsafe':
    tb = tb.tb_next
  return tb is not None and str(unraisable.exc_value) == 'Event loop is closed'


def drop_orbax_aftermath() -> None:
  """Wraps `sys.unraisablehook` (once) to drop exactly the reports of `_is_orbax_aftermath`."""
  previous = sys.unraisablehook
  if not getattr(previous, '_drops_orbax_aftermath', False):

    def hook(unraisable):
      if not _is_orbax_aftermath(unraisable):
        previous(unraisable)

    hook._drops_orbax_aftermath = True  # pylint: disable=protected-access
    sys.unraisablehook = hook
