"""Errors caused by what the user asked for (bad paths, files, values), not by kdzoo bugs.

The ``kdzoo`` command prints these as one ``error:`` line instead of a traceback
(set ``KDZOO_DEBUG=1`` to see the traceback anyway).
"""

__all__ = ["ConfigError", "DataError", "KDZooError"]


class KDZooError(Exception):
    """Base class of errors a user fixes by changing a config value, a path or a file."""


class ConfigError(KDZooError, ValueError):
    """A config value is out of range or inconsistent with another one."""


class DataError(KDZooError, ValueError):
    """A DataModule argument is out of range, or a data file is malformed."""
