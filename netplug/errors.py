"""The error taxonomy. Every error the user can see is a NetplugError with a message that says
what was wrong and how to fix it; `dispatch` turns it into Docker's `{"Err": ...}` answer.

Status codes follow Docker, not REST: dockerd treats every non-200 answer as a failure and shows
`Err` verbatim, but it swallows a 404 from Program/RevokeExternalConnectivity ("not implemented"),
so 404 is kept for unknown paths only.
"""

from __future__ import annotations


class NetplugError(Exception):
    """Base class: a failure with a message meant for the person at the docker command."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequest(NetplugError):
    """The request body is malformed or misses a required field."""

    status = 400


class InvalidOption(InvalidRequest):
    """A network or endpoint option is unknown or has a bad value."""

    def __init__(self, option: str, value: object, allowed: str) -> None:
        if value is None:
            message = f"option {option!r}: {allowed}"
        else:
            message = f"invalid value {value!r} for option {option!r}: {allowed}"
        super().__init__(message)
        self.option = option


class NotFound(NetplugError):
    """A network or endpoint netplug has no record of."""

    status = 400


class Conflict(NetplugError):
    """The request collides with something that exists (a subnet, a bridge, a host port)."""

    status = 400


class TooLarge(NetplugError):
    status = 413


class Unsupported(NetplugError):
    """A call that a local-scope driver does not implement."""

    status = 400


class KernelError(NetplugError):
    """The kernel refused an operation (netlink or nftables)."""

    status = 500


class LinkExists(KernelError):
    pass


class LinkMissing(KernelError):
    pass
