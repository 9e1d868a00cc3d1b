"""Fixtures of the method tests."""

from digits_helpers import digits  # noqa: F401  (the session fixture: one CNN trained for all conv tests)
