"""A minimal HTTP client for the endpoints CI uses: ``GET /v1/ledger``, ``POST /v1/outcomes`` and,
when exploring, ``POST /v1/resample``.

Standard library only (``urllib.request``). The token goes into the ``Authorization`` header and
nowhere else: not into messages, exceptions or ``repr``.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kaizen_client import __version__
from kaizen_client.ledger import LedgerEntry, Warn, parse_entries

__all__ = ["KaizenClient", "KaizenError", "KaizenRejected", "KaizenUnavailable"]


class KaizenError(Exception):
    """Any failure to talk to the Kaizen server."""


class KaizenUnavailable(KaizenError):
    """The server could not be reached, timed out, or answered 5xx: worth retrying later."""


class KaizenRejected(KaizenError):
    """The server answered 4xx. ``status`` is the HTTP status, ``retryable`` says whether the
    request may succeed later unchanged (409 conflict, 429 too many requests)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again later may succeed."""
        return self.status in (409, 429)


def _error_message(body: bytes) -> str:
    """The message of the API's error shape, or the start of the body."""
    try:
        data = json.loads(body.decode("utf-8"))
        message = data["error"]["message"]
        if isinstance(message, str):
            return message[:500]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


class KaizenClient:
    """Talks to a Kaizen server as a ``ci`` token.

    ``url`` is the server's base URL (``https://kaizen.example.com``; a trailing ``/v1`` is
    accepted too). ``timeout`` bounds each request in seconds, end to end.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0) -> None:
        base = url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = base
        self._token = token or None
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"KaizenClient(url={self.url!r}, token={'***' if self._token else None})"

    def fetch_ledger(
        self,
        repository: str,
        *,
        since: str | None = None,
        timeout: float | None = None,
        warn: Warn | None = None,
    ) -> list[LedgerEntry]:
        """The server's active ledger entries for ``repository`` (``GET /v1/ledger``).

        Malformed entries are skipped with a warning. Raises ``KaizenUnavailable`` or
        ``KaizenRejected``.
        """
        query = {"repository": repository}
        if since:
            query["since"] = since
        data = self._request("GET", "/v1/ledger?" + urllib.parse.urlencode(query), None, timeout)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise KaizenUnavailable(f"{self.url}/v1/ledger answered without a 'data' list")
        return parse_entries(items, source=f"{self.url}/v1/ledger", warn=warn)

    def post_outcome(
        self, report: dict[str, Any], *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send one run's outcome report (``POST /v1/outcomes``); returns the server's answer.

        Raises ``KaizenUnavailable`` or ``KaizenRejected``.
        """
        answer = self._request("POST", "/v1/outcomes", report, timeout)
        return answer if isinstance(answer, dict) else {}

    def resample(
        self,
        completion_id: str,
        choice_index: int = 0,
        *,
        n: int = 4,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """``n`` alternatives of a served completion, sampled from its recorded context and
        recorded by the server as a completion of their own (``POST /v1/resample``): the
        answer's ``id`` and ``alternatives`` (``index``, ``text``, ``finish_reason``).

        Raises ``KaizenUnavailable`` or ``KaizenRejected``.
        """
        body = {"completion_id": completion_id, "choice_index": choice_index, "n": n}
        answer = self._request("POST", "/v1/resample", body, timeout)
        if not isinstance(answer, dict) or not isinstance(answer.get("alternatives"), list):
            raise KaizenUnavailable(f"{self.url}/v1/resample answered without 'alternatives'")
        return answer

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None
    ) -> Any:
        """Run one request in a helper thread so that ``timeout`` bounds it as a whole
        (urllib's own timeout applies per socket operation)."""
        limit = self.timeout if timeout is None else timeout
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = self._send(method, path, body, max(limit, 0.001))
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc

        worker = threading.Thread(target=target, name="kaizen-http", daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive():
            raise KaizenUnavailable(f"{self.url} did not answer within {limit:g} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def _send(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
        headers = {"Accept": "application/json", "User-Agent": f"kaizen-client/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        where = f"{method} {self.url}{path.split('?', 1)[0]}"
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = _error_message(exc.read())
            except OSError:
                detail = ""
            message = f"{where} answered {exc.code}" + (f": {detail}" if detail else "")
            if exc.code >= 500:
                raise KaizenUnavailable(message) from None
            raise KaizenRejected(message, exc.code) from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KaizenUnavailable(f"{where} failed: {reason}") from None
        if not payload:
            return {}
        try:
            return json.loads(payload.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise KaizenUnavailable(f"{where} answered with something other than JSON") from None
