"""The types of ``httpx.AsyncClient``'s arguments, from httpx's public classes.

The same unions as httpx's private types module, spelt out here so that
HostRouter's signature (which repeats AsyncClient's, so type checkers catch a
misspelt argument) depends on no private module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from http.cookiejar import CookieJar
from typing import Any

import httpx

__all__ = [
    "AuthTypes",
    "CertTypes",
    "CookieTypes",
    "EventHook",
    "HeaderTypes",
    "ProxyTypes",
    "QueryParamTypes",
    "TimeoutTypes",
]

_Primitive = str | int | float | bool | None
QueryParamTypes = (
    httpx.QueryParams
    | Mapping[str, _Primitive | Sequence[_Primitive]]
    | list[tuple[str, _Primitive]]
    | tuple[tuple[str, _Primitive], ...]
    | str
    | bytes
)
HeaderTypes = (
    httpx.Headers
    | Mapping[str, str]
    | Mapping[bytes, bytes]
    | Sequence[tuple[str, str]]
    | Sequence[tuple[bytes, bytes]]
)
CookieTypes = httpx.Cookies | CookieJar | dict[str, str] | list[tuple[str, str]]
CertTypes = str | tuple[str, str] | tuple[str, str, str]
TimeoutTypes = (
    float | None | tuple[float | None, float | None, float | None, float | None] | httpx.Timeout
)
ProxyTypes = httpx.URL | str | httpx.Proxy
AuthTypes = tuple[str | bytes, str | bytes] | Callable[[httpx.Request], httpx.Request] | httpx.Auth
EventHook = Callable[..., Any]
