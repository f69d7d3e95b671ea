"""Feature fixtures, one module per area; :mod:`pytest_kata.plugin` loads every module in this package."""
