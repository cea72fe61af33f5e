"""ASGI guards that run before BentoML's own middlewares: unknown routes, oversized queries, client-error logs.

* :class:`KnownRoutesOnly`: a request for a path no route of the app matches is answered 404 here.
  BentoML's metrics middleware labels every request with its raw path, so each unknown path became
  about 20 new Prometheus series: 600 requests for random 8 KB paths, sent without a key, grew
  ``/metrics`` from 14 KB to 98 MB and the server by 344 MB. Known paths are remembered (a few). A known path
  asked with a method it does not take is a JSON 405 naming the methods (Starlette's is plain text).
* :func:`quiet_client_errors`: BentoML logs a request its input validation refuses (a 400, e.g. ``k=0``)
  as ``ERROR Exception on /recommend`` with a traceback; anyone could fill the log that way. Such
  records become one INFO line with the status and the reason (for ``/recommend`` and ``/similar`` the
  fields and what to send: ``answered 400: k: Input should be a valid integer ...``,
  the title :func:`bentos.service.explained` gives the error); server errors keep their traceback.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.routing import Match

log = logging.getLogger(__name__)

#: at most this many distinct known paths are remembered (a route with path parameters matches many)
_KNOWN_MAX = 1024


class KnownRoutesOnly:
    """404 for a path that none of ``app.router``'s routes matches, before any inner middleware sees it."""

    def __init__(self, app):
        self.app = app
        self.routes = list(getattr(getattr(app, "router", None), "routes", None) or [])
        self.known: set[tuple[str, str]] = set()  # (method, path) that a route serves

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.routes and (key := (scope["method"], scope["path"])) not in self.known:
            matches = [(route, route.matches(scope)[0]) for route in self.routes]
            if all(m == Match.NONE for _, m in matches):
                return await JSONResponse({"error": "no such route: the API is described at /docs.json"},
                                          status_code=404)(scope, receive, send)
            if not any(m == Match.FULL for _, m in matches):  # the path exists, not for this method
                allowed = list(dict.fromkeys(x for r, m in matches if m == Match.PARTIAL
                                             for x in sorted(getattr(r, "methods", None) or ())))
                # Starlette's own answer is plain text; every other error of the API is JSON
                return await JSONResponse({"error": f"{scope['method']} is not allowed on {scope['path']}: use "
                                                    f"{' or '.join(allowed) or 'another method'}"}, status_code=405,
                                          headers={"Allow": ", ".join(allowed)})(scope, receive, send)
            if len(self.known) < _KNOWN_MAX:
                self.known.add(key)
        return await self.app(scope, receive, send)


class _ClientErrorFilter(logging.Filter):
    """Turns BentoML's ``Exception on <path>`` record of a client error (status < 500) into one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        status = _client_status(exc)
        if status is None:
            return True
        reason = _reason(exc)
        record.msg = f"{str(record.msg).removeprefix('Exception on ')} answered {status}: %s"
        record.args = (*(record.args or ()), reason)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def _reason(exc: BaseException) -> str:
    """The first line of what was wrong: for a validation error shoprec explained (:func:`bentos.service.explained`:
    its title names each field and what to send), that title without pydantic's "1 validation error for " header."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and " " in exc.title:  # a bare model name ("Input") is no explanation
        return exc.title.splitlines()[0][:200]
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _client_status(exc: BaseException) -> int | None:
    """The 4xx status BentoML answers ``exc`` with, or None for a server error."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return code if isinstance(code, int) and 400 <= code < 500 else None


def quiet_client_errors() -> None:
    """Install :class:`_ClientErrorFilter` on BentoML's HTTP app logger (idempotent)."""
    logger = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, _ClientErrorFilter) for f in logger.filters):
        logger.addFilter(_ClientErrorFilter())


def log_refused(scope: dict, status: int, reason: str) -> None:
    """One INFO line per refused request: method, path, the client's address, status and reason (never the key;
    newlines escaped and the reason cut at 300 characters, so a sender can neither forge lines nor make one long)."""
    client = (scope.get("client") or ("?",))[0]
    text = reason if len(reason) <= 300 else reason[:300] + "..."
    log.info("refused %s %s from %s: %d %s", scope.get("method", "?"), scope.get("path", "?"), client, status,
             text.replace("\r", "\\r").replace("\n", "\\n"))
