"""Why a download attempt failed: the one place where aiohttp and OSError exceptions become
failure details (`describe_exception`), and whether another attempt may help.

A `Failure` is one line a user can act on (it names the host, the status or the file) plus
`transient`: the retry loop in `downloader` tries again only after transient failures.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from tedge_firmware.core.http import parse_retry_after
from tedge_firmware.core.retry import describe_status, format_seconds, is_transient_status
from tedge_firmware.core.text import one_line


@dataclass(frozen=True)
class Failure:
    """Why one attempt failed: a single-line detail, and whether another try may help."""

    detail: str
    transient: bool
    retry_after: float | None = None
    space_short: int | None = None  # bytes the disk lacks for the file (and the reserve)


class AttemptFailed(Exception):
    """An attempt or a file operation failed; carries the Failure (never leaves the downloader)."""

    def __init__(self, failure: Failure, *, unreachable: bool = False) -> None:
        super().__init__(failure.detail)
        self.failure = failure
        # the last of transient failures (network, 5xx, stalls): the origin could not be
        # reached, as opposed to an answer that settles it (404, digest mismatch)
        self.unreachable = unreachable


@dataclass(frozen=True)
class FailureContext:
    """What the exception mapping needs to make a detail precise."""

    host: str
    port: int | None
    stall_timeout: float
    received: int = 0
    expected: int | None = None


def status_failure(response: aiohttp.ClientResponse) -> Failure:
    """An answer that is not the file: transient or not by its status, with its Retry-After."""
    transient = is_transient_status(response.status)
    retry_after = None
    if transient:
        retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
    detail = describe_status(response.status, response.reason)
    if response.status == 407:  # the site's proxy, relaying an http origin
        detail += " from the proxy (proxy.username, proxy.password)"
    return Failure(detail, transient, retry_after)


_Describe = Callable[[BaseException, FailureContext], Failure]


def _endpoint(context: FailureContext) -> str:
    return f"{context.host}:{context.port}" if context.port is not None else context.host


def _dns(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"DNS lookup failed for {context.host}", transient=True)


def _tls(exc: BaseException, context: FailureContext) -> Failure:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    reason = one_line(getattr(cause, "verify_message", None) or _strerror(cause), limit=120)
    return Failure(f"TLS error with {_endpoint(context)}: {reason}", transient=False)


def _connect(exc: BaseException, context: FailureContext) -> Failure:
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(os_error, ConnectionRefusedError) or _errno(os_error) == errno.ECONNREFUSED:
        return Failure(f"connection refused ({_endpoint(context)})", transient=True)
    reason = one_line(_strerror(os_error), limit=120)
    return Failure(f"cannot connect to {_endpoint(context)}: {reason}", transient=True)


def _connect_timeout(exc: BaseException, context: FailureContext) -> Failure:
    seconds = format_seconds(context.stall_timeout)
    return Failure(f"connect timeout: no connection within {seconds} ({_endpoint(context)})", True)


def _stalled(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"stalled: no data for {format_seconds(context.stall_timeout)}", True)


def _fingerprint(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"TLS certificate fingerprint mismatch ({_endpoint(context)})", False)


def _disconnected(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"server disconnected before answering ({_endpoint(context)})", True)


def _network(exc: BaseException, context: FailureContext) -> Failure:
    if isinstance(exc, ConnectionResetError) or _errno(exc) == errno.ECONNRESET:
        return Failure(f"connection reset ({_endpoint(context)})", transient=True)
    reason = one_line(_strerror(exc), limit=120)
    return Failure(f"network error with {_endpoint(context)}: {reason}", transient=True)


def _payload(exc: BaseException, context: FailureContext) -> Failure:
    if context.expected is not None:
        detail = f"incomplete body: got {context.received} of {context.expected} bytes"
    else:
        detail = f"incomplete body: broken after {context.received} bytes"
    return Failure(detail, transient=True)


def _redirects(exc: BaseException, context: FailureContext) -> Failure:
    return Failure("too many redirects", transient=False)


def _proxy_status(exc: BaseException, context: FailureContext) -> Failure:
    status = exc.status if isinstance(exc, aiohttp.ClientResponseError) else 0
    keys = " (proxy.username, proxy.password)" if status == 407 else ""
    return Failure(f"proxy answered {describe_status(status)}{keys}", is_transient_status(status))


def _proxy_connect(exc: BaseException, context: FailureContext) -> Failure:
    reason = one_line(_strerror(exc), limit=120)
    return Failure(f"cannot connect to the proxy (proxy.address): {reason}", transient=True)


def _bad_response(exc: BaseException, context: FailureContext) -> Failure:
    message = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    reason = one_line(str(message), limit=120)
    return Failure(f"invalid HTTP response from {_endpoint(context)}: {reason}", False)


def _bad_redirect(exc: BaseException, context: FailureContext) -> Failure:
    return Failure("redirect to an invalid or non-HTTP url", transient=False)


def _bad_url(exc: BaseException, context: FailureContext) -> Failure:
    return Failure("invalid url", transient=False)


def _bad_host(exc: BaseException, context: FailureContext) -> Failure:
    # Only the resolver raises it, for a host the first check did not see (a redirect's)
    return Failure(f"invalid url: a host name the resolver refuses ({exc})", transient=False)


def _timeout(exc: BaseException, context: FailureContext) -> Failure:
    return Failure(f"timed out ({_endpoint(context)})", transient=True)


def _other_client_error(exc: BaseException, context: FailureContext) -> Failure:
    reason = one_line(str(exc) or type(exc).__name__, limit=120)
    return Failure(f"client error: {reason}", transient=True)


# Most specific first: the first entry whose type matches describes the exception.
EXCEPTION_MAP: tuple[tuple[type[BaseException], _Describe], ...] = (
    (aiohttp.ClientConnectorDNSError, _dns),
    (aiohttp.ClientSSLError, _tls),
    (aiohttp.ClientProxyConnectionError, _proxy_connect),
    (aiohttp.ClientConnectorError, _connect),
    (aiohttp.ConnectionTimeoutError, _connect_timeout),
    (aiohttp.SocketTimeoutError, _stalled),
    (aiohttp.ServerTimeoutError, _stalled),
    (aiohttp.ServerFingerprintMismatch, _fingerprint),
    (aiohttp.ServerDisconnectedError, _disconnected),
    (aiohttp.ClientConnectionResetError, _network),
    (aiohttp.ClientOSError, _network),
    (aiohttp.ClientConnectionError, _network),
    (aiohttp.ClientPayloadError, _payload),
    (aiohttp.TooManyRedirects, _redirects),
    (aiohttp.ClientHttpProxyError, _proxy_status),
    (aiohttp.ClientResponseError, _bad_response),
    (aiohttp.RedirectClientError, _bad_redirect),
    (aiohttp.NonHttpUrlClientError, _bad_url),
    (aiohttp.InvalidURL, _bad_url),
    (UnicodeError, _bad_host),
    (aiohttp.UploadAbortedError, _other_client_error),  # we send no body; listed for completeness
    (aiohttp.ClientError, _other_client_error),
    (TimeoutError, _timeout),
    (OSError, _network),
)


def describe_exception(exc: BaseException, context: FailureContext) -> Failure:
    """Map an exception raised while fetching into a Failure (detail + transient or not)."""
    for kind, describe in EXCEPTION_MAP:
        if isinstance(exc, kind):
            return describe(exc, context)
    raise exc


def _errno(exc: BaseException) -> int | None:
    return exc.errno if isinstance(exc, OSError) else None


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
