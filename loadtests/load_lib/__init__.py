"""Shared code of the HTTP load test (loadtests/locustfile.py and loadtests/run_load.py).

* ``mix``      the request mix (sizes, tasks, samplers, sync/async, bodies) and its request bodies;
* ``records``  one JSON line per request, written by either load generator, read by the report;
* ``openloop`` an asyncio + httpx open-loop generator (Poisson arrivals) for the capacity and hop profiles;
* ``scrape``   /metrics before and after, parsed with prometheus_client's parser, as deltas;
* ``services`` start `flowie serve`, or redis-server + `flowie api` + N x `flowie worker`, on free ports;
* ``report``   statistics, report.json, report.md and the two figures.

Only loopback targets are accepted (``check_loopback``): this is a load generator.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class NotLoopback(ValueError):
    """The target is not a loopback address."""


def check_loopback(url: str) -> str:
    """Return ``url`` (without a trailing slash) when its host is a loopback address, else raise.

    Accepted: 127.0.0.0/8, ::1 and ``localhost`` (resolved, and every address must be loopback).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopback(f"{url!r} is not an http(s) URL with a loopback host")
    host = parts.hostname
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if host.lower() != "localhost":
            raise NotLoopback(f"refusing {host!r}: only loopback targets (127.0.0.1, ::1, localhost)") from None
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise NotLoopback(f"cannot resolve {host!r}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    bad = [str(a) for a in addresses if not a.is_loopback]
    if bad or not addresses:
        raise NotLoopback(f"refusing {host!r} ({', '.join(bad) or 'no address'}): only loopback targets")
    return url.rstrip("/")
