"""What went wrong with a worker's response, said for the user: HTTP errors, TLS, connects."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ddump.protocol import BATCH_PARAM


@dataclass
class Response:
    """A response's status, and the start of its body when it is an error."""

    code: int = 0
    reason: str = ""
    error_body: bytes = b""


def http_error(response: Response) -> str:
    text = response.error_body.decode("utf-8", "replace").strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    html = first.startswith("<")
    if html:
        first = _html_title(text) or first
    status = f"HTTP {response.code} {response.reason}".rstrip()
    parts = [status]
    hint = _hint(response.code, text, html)
    if hint:
        parts.append(hint)
    if first:
        parts.append(first[:300])
    return ": ".join(parts)


def _hint(code: int, text: str, html: bool) -> str:
    # nginx answers TLS-client problems with a 400 HTML page: say what to fix on our side.
    if "SSL certificate" in text:
        return "the proxy wants a client certificate it trusts: give --cert and --key"
    if "plain HTTP request was sent to HTTPS port" in text:
        return "the target speaks https: use https://"
    if code == 400 and f"unknown parameter '{BATCH_PARAM}'" in text:
        return "this worker is older than batch captures: upgrade it, or leave out --batch"
    if code == 400:
        return "the server refused the request" if html else "the worker refused the request"
    return {
        401: "authentication failed: check the user and password",
        403: "forbidden: the proxy refused this client (certificate or address)",
        404: "not found: is the path right (default /capture)?",
        502: "the proxy could not reach the worker (is ddump-worker running?)",
        503: "the worker cannot capture now",
    }.get(code, "")


def _html_title(text: str) -> str:
    lower = text.lower()
    start, end = lower.find("<title>"), lower.find("</title>")
    if start == -1 or end <= start:
        return ""
    return text[start + len("<title>") : end].strip()


def connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is ddump-worker running and listening on that port?)"
    name = type(exc).__name__
    if name == "gaierror" or "Name or service not known" in str(exc):
        return f"cannot resolve host name ({exc.strerror or exc})"
    return f"cannot connect: {exc.strerror or exc}"


def ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or str(exc)
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return f"{reason} (does the server require a client certificate? use --cert and --key)"
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        return f"{reason} (the server rejected our client certificate)"
    if "WRONG_VERSION_NUMBER" in reason:
        return f"{reason} (is the target plain http?)"
    return reason


def closed_reason(real: BaseException | None, response: Response, tls: bool) -> str:
    """Why the connection closed, said by how far the response had come (`real`: the
    system's error, None when the peer closed it)."""
    if isinstance(real, ssl.SSLError):
        return f"TLS failure: {ssl_reason(real)}"
    if response.code == 0:
        hint = (
            " (TLS: the server may require a client certificate, --cert/--key, or refuse ours)"
            if tls
            else ""
        )
        return "connection closed before any response" + (f" ({real})" if real else hint)
    return "connection lost mid-stream" + (f" ({real})" if real else "")
