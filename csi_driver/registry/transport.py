"""HTTP for registry transfers, on ``requests``' public API.

What a session made here does that a plain one does not:

* every request streams (nothing is read whole behind the caller's back) and times
  out, never later than the running transfer's deadline (``cancel.Cancel``);
* every connection a transfer sends a request on is handed to its token, so that
  cancelling shuts its socket down and a read a silent server holds returns at once;
* credentials come from the caller only: ``~/.netrc`` is never read (requests would
  read it for any request without its own auth), and a redirect to another scheme,
  host or port drops the ``Authorization`` header (a blob served from a storage
  bucket gets no registry credentials). The environment's CA bundle
  (``REQUESTS_CA_BUNDLE``) and proxies are honoured, as for any requests user.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import requests
import requests.adapters
import requests.auth
import urllib3.connection
import urllib3.connectionpool

from csi_driver.registry import cancel

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0


class _Watched:
    """A connection that the running transfer's token may shut down (``cancel.Cancel``)."""

    def request(self, *args: Any, **kwargs: Any) -> None:
        token = cancel.current()
        if token is not None:
            token.watch(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _NoNetrc(requests.auth.AuthBase):
    """The session's own auth: none. Its presence keeps requests from reading ~/.netrc."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


def same_origin(a: str, b: str) -> bool:
    """Whether two URLs name the same scheme, host and port."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme.lower(), pa.netloc.lower()) == (pb.scheme.lower(), pb.netloc.lower())


class Session(requests.Session):
    """A requests session for one registry (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.auth = _NoNetrc()
        self.mount("http://", _WatchedAdapter())
        self.mount("https://", _WatchedAdapter())

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        """On a redirect: the Authorization header stays only on the same origin; ~/.netrc
        is never consulted (requests' own rule would)."""
        url = prepared_request.url or ""
        if "Authorization" in prepared_request.headers and not same_origin(response.request.url or "", url):
            del prepared_request.headers["Authorization"]

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        """A streamed request whose timeouts never pass the running transfer's deadline."""
        connect, read = CONNECT_TIMEOUT, READ_TIMEOUT
        token = cancel.current()
        if token is not None:
            token.check()
            left = token.remaining()
            if left is not None:
                connect, read = max(0.001, min(connect, left)), max(0.001, min(read, left))
        kwargs.setdefault("timeout", (connect, read))
        kwargs.setdefault("stream", True)
        return super().request(method, url, *args, **kwargs)


def read_capped(r: requests.Response, cap: int) -> bytes | None:
    """At most ``cap`` bytes of a streamed body, then closed; None when it is longer
    (the rest is never read)."""
    data = bytearray()
    try:
        for chunk in r.iter_content(16 << 10):
            data += chunk
            if len(data) > cap:
                return None
            cancel.check()
    except (requests.exceptions.RequestException, OSError):
        pass  # what came is what there is: an error body is only a hint
    finally:
        r.close()
    return bytes(data)
