"""Typed errors shared by every subsystem.

Each error names the object or setting at fault and, where there is one, what to do
about it; the CLI prints `str(err)` and exits non-zero, daemons log it and keep going.
"""

from __future__ import annotations


class NodeagentError(Exception):
    """Base of every error nodeagent raises on purpose.

    `hint` says what the user can do about it and is appended to the message.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class ConfigError(NodeagentError):
    """A resource, file or setting is invalid. `where` names it (file, object, field)."""

    def __init__(self, where: str, message: str, hint: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}", hint)


class EnvironmentProblem(NodeagentError):
    """The machine lacks something nodeagent needs (bcc, headers, cgroup v2, a capability...)."""


class LabError(NodeagentError):
    """The lab could not do what was asked (no lab running, a pod not found...)."""
