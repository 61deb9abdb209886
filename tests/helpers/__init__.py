"""Helpers for the primitive test suites: fixtures, child processes, key checks.

Test modules load the fixtures with ``pytest_plugins = ["helpers.fixtures"]``
(``tests/`` is on ``sys.path`` because the suite's ``conftest.py`` lives there).
"""
