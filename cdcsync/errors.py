"""One error hierarchy; each error carries the CLI exit code it maps to.

Exit codes (documented in the README):
0 done, 1 unexpected failure, 2 usage or configuration, 3 precondition not met,
4 aborted safely, 5 state unknown (page someone), 6 halted on bad input,
75 another cutover or rollback holds the lock.
"""

from __future__ import annotations


class CdcsyncError(Exception):
    """Base of every error cdcsync raises on purpose."""

    exit_code = 1


class ConfigError(CdcsyncError):
    """A setting is missing or invalid; the message names it."""

    exit_code = 2


class PreconditionError(CdcsyncError):
    """The databases or services are not in a state that allows the command."""

    exit_code = 3


class AbortedSafely(CdcsyncError):
    """The command gave up and put everything back as it was."""

    exit_code = 4


class StateUnknown(CdcsyncError):
    """cdcsync cannot tell which side is writable: a person must look."""

    exit_code = 5


class HaltedError(CdcsyncError):
    """Processing stopped at an event it cannot apply; nothing past it was committed."""

    exit_code = 6


class LockHeld(CdcsyncError):
    """Another cutover or rollback is running."""

    exit_code = 75


class StackError(CdcsyncError):
    """A service of the local stack failed to install, start or stop; carries its log tail."""

    exit_code = 3

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail

    def __str__(self) -> str:
        base = super().__str__()
        if not self.log_tail:
            return base
        return f"{base}\n--- log tail ---\n{self.log_tail}"


class DecodeError(CdcsyncError):
    """A Kafka message is not a Debezium event cdcsync understands.

    The only exception decoding raises; it names the field at fault, and the
    consumer adds topic, partition, offset and key.
    """

    exit_code = 6

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason if field is None else f"{field}: {reason}")
        self.reason = reason
        self.field = field
