"""The exceptions microcs raises: ``microcs.Error`` and one subclass per kind of failure.

Each class also derives from the built-in exception it resembles, so ``except TimeoutError``
catches ``microcs.TimedOut`` too. ``str(e)`` is the library's message: what happened and what to
do about it.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "Error",
    "InvalidName",
    "InvalidConfig",
    "NoService",
    "StartFailed",
    "NameTaken",
    "TimedOut",
    "RemoteError",
    "FrameTooLarge",
    "ProtocolError",
    "PermissionDenied",
    "Closed",
]


class Error(Exception):
    """Base class of every microcs error; raised as itself for other I/O failures."""

    #: True when the request may have reached the server and run before the failure (for
    #: example, the connection broke while waiting for the reply). microcs never re-sends such
    #: a request by itself; whether to retry is the caller's decision.
    may_have_run: bool

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.may_have_run = False


class InvalidName(Error, ValueError):
    """A service or method name is not valid (the message says what is allowed)."""


class InvalidConfig(Error, ValueError):
    """A setting does not make sense: an unknown ``transport``, ``transport="nats"`` without a
    NATS URL, an empty or malformed URL, a ``version`` that is not SemVer for a service on NATS."""


class NoService(Error, ConnectionError):
    """No service of that name is running."""


class StartFailed(NoService):
    """Nobody served the name, and starting it from its service definition failed: the command
    could not run, exited before it registered, or did not register within the start timeout.
    The message has the command, its exit status and the end of its log."""


class NameTaken(Error):
    """Another live server already owns the name."""

    #: The pid of the server that owns the name, when known.
    owner_pid: Optional[int]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.owner_pid = None


class TimedOut(Error, TimeoutError):
    """The request did not complete before its deadline."""


class RemoteError(Error):
    """The server answered with an error: its handler raised, or the method does not exist.

    A handler may raise it to choose the code and message its caller gets::

        raise microcs.RemoteError("send a board to step", code=400)

    Any other exception in a handler reaches the caller with code 500 and the message
    ``"ExceptionType: message"``.
    """

    #: The status code (HTTP's meanings: 400 bad request, 404 no such method, 500 handler failed).
    code: int
    #: The message as the server wrote it (``str(e)`` also names the service).
    message: str

    def __init__(self, message: str = "", code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class FrameTooLarge(Error):
    """A payload is over the limit of whoever would receive it; nothing was sent."""


class ProtocolError(Error):
    """The peer broke the protocol or does not speak it (or a reply is not the text expected)."""


class PermissionDenied(Error, PermissionError):
    """Not allowed: another user's service, an unsafe runtime directory, a file in the way."""


class Closed(Error, ConnectionError):
    """The connection, client or server is closed."""
