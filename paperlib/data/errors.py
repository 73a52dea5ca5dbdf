"""Errors raised by :mod:`paperlib.data`.

Every bad-input error in the data package is a :class:`DataError` (a ``ValueError``) whose message names the
problem and the fix. Wrong argument *types* raise :class:`DataTypeError`, which is both a ``DataError`` and a
``TypeError``, so ``except DataError`` catches everything the data package rejects.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad data argument; the message says what is wrong and how to fix it."""


class DataTypeError(DataError, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


class DataWarning(UserWarning):
    """Data that can be used but probably is not what was meant (e.g. a split without some declared classes)."""
