"""Errors the service layer raises for the API to turn into responses."""

from __future__ import annotations


class ApiError(Exception):
    """An error with an HTTP status and a message the client can act on."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
