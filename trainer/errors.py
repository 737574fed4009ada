"""Errors that retrying cannot heal: a wrong config, missing data, a refused checkpoint.

The entry point reports them in one line (no traceback) with exit code :data:`CONFIG_ERROR_EXIT`,
and ``python -m launch run`` checks for them before it starts torchrun, so a typo is not
restarted ``--max-restarts`` times on every rank.
"""
from __future__ import annotations

#: process exit code for a :class:`ConfigError` (argparse's "usage error" code)
CONFIG_ERROR_EXIT = 2


class ConfigError(ValueError):
    """The run cannot start as configured; the message names the key, file, split or value."""


class PretrainedMismatchError(RuntimeError):
    """A weights file does not fit the module it is loaded into; the message lists the offending keys."""
