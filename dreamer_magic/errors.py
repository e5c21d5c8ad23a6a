"""Errors a user can act on.

The core raises :class:`DreamerError` (or a subclass) with a message that names the bad
value and the fix; ``magics.py`` turns it into IPython's ``UsageError`` at the boundary so a
notebook user sees one line instead of a traceback.
"""

from __future__ import annotations


class DreamerError(Exception):
    """A problem the user can fix. The message names the problem and the remedy."""


class InvalidNameError(DreamerError, ValueError):
    """A step or trainer name breaks the naming rule."""


class FingerprintError(DreamerError, TypeError):
    """A value cannot be fingerprinted (never silently replaced by a random key)."""


class StorageError(DreamerError):
    """An output cannot be saved, or a saved output cannot be loaded."""


class CacheMissError(DreamerError, LookupError):
    """``cache_only=True`` was asked for, but some requests are not in the generation cache."""


class CacheWarning(UserWarning):
    """Something about a cache deserves attention but does not stop the work."""


class PickleRefusedError(StorageError):
    """A saved output is a pickle and ``allow_pickle`` is off: refuse rather than re-run."""


class DamagedResultError(StorageError):
    """A saved result must not be loaded: a file changed since the save, or a path or symlink in
    it leads outside its folder. The lifecycle treats it as a miss and sets the folder aside."""
