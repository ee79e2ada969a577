"""The one error type of the HTTP layer: an answer with a 4xx/5xx status, a short reason code (also the label of
kdkit_errors_total) and a one-line message; the app turns it into JSON {"error": message, "reason": reason}."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
