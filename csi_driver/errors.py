"""Domain errors raised by the engine; the gRPC layer maps each to one status code."""

from __future__ import annotations


class DriverError(Exception):
    """Base class: ``code`` names the CSI/gRPC status the servicers return."""

    code = "INTERNAL"


class InvalidArgument(DriverError):
    code = "INVALID_ARGUMENT"


class NotFound(DriverError):
    code = "NOT_FOUND"


class AlreadyExists(DriverError):
    code = "ALREADY_EXISTS"


class OutOfRange(DriverError):
    code = "OUT_OF_RANGE"


class ResourceExhausted(DriverError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(DriverError):
    code = "FAILED_PRECONDITION"


class Aborted(DriverError):
    code = "ABORTED"


class Unavailable(DriverError):
    code = "UNAVAILABLE"


class CommandFailed(DriverError):
    """A host tool (mount, mkfs, ...) failed; carries its stderr for the log."""

    code = "INTERNAL"

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(f"{argv[0]} exited {returncode}: {self.stderr[:500]}")
