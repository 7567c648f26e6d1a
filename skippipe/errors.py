"""Errors that reach the user as one line and an exit code (DESIGN.md section 9)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: config, topology, plan, checkpoint or CLI argument.

    The CLI prints ``error: <message>`` on one line and exits with code 2. The message names the
    key or file and says how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or is inconsistent with another key."""


class TopologyError(UserError):
    """A topology file or inline topology is malformed."""


class PlanError(UserError):
    """A plan breaks a path rule or is malformed."""


class RunFailed(Exception):
    """A run could not go on (a worker died, raised or went silent); the CLI exits with code 1."""

    exit_code = 1


class VerificationFailed(Exception):
    """A verification found a difference; the CLI exits with code 1."""

    exit_code = 1
