"""Errors of the suite.

``MembenchError`` is the root; the CLI turns it into one line and exit code 2.
``ApiError`` carries an HTTP status and is rendered by the app as
``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations


class MembenchError(Exception):
    """Raised for a user mistake or an environment problem the user can fix."""


class UsageError(MembenchError):
    """Raised when a command-line value or preset is not usable."""


class ApiError(Exception):
    """Raised by a route to answer with a JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)
