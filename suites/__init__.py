"""The validation suites users run against a candidate Kata release.

In a checkout: ``pytest suites/ --kata-candidate PATH``. Installed: ``pytest --pyargs pytest_kata.suites``
or ``pytest-kata run [SUITE...] -- [PYTEST ARGS]``.
"""
