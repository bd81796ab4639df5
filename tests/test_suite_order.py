"""The suite's own schedule (tests/conftest.py): files are collected longest first, so xdist's
loadfile workers (scripts/test.sh, --no-loadscope-reorder) never start a long file last."""

import os
import types

import conftest

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_every_timed_file_exists():
  missing = [
    name for name in conftest.FILE_SECONDS if not os.path.isfile(os.path.join(TESTS, name))
  ]
  assert not missing, f'FILE_SECONDS names files that are gone: {missing}'


def test_files_longest_first_each_file_in_its_own_order():
  item = lambda nodeid: types.SimpleNamespace(nodeid=nodeid)
  ids = [
    'tests/test_data.py::a',
    'tests/test_main.py::b',
    'tests/test_unknown_x.py::c',
    'tests/test_multihost.py::d',
    'tests/test_main.py::e',
    'tests/test_unknown_y.py::f',
    'tests/test_unknown_y.py::g',
  ]
  items = [item(i) for i in ids]
  conftest.pytest_collection_modifyitems(None, items)
  # Timed files by their seconds; untimed ones after them, more tests first.
  assert [i.nodeid.split('/')[-1] for i in items] == [
    'test_multihost.py::d',
    'test_main.py::b',
    'test_main.py::e',
    'test_unknown_y.py::f',
    'test_unknown_y.py::g',
    'test_data.py::a',
    'test_unknown_x.py::c',
  ]
