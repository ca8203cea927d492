#!/usr/bin/env python3
"""Container health probe: GET http://127.0.0.1:$PORT/PATH and exit 0 on a 2xx answer, else 1.

Standard library only (the image has no curl). Defaults probe the API's /healthz on FLOWIE_PORT;
a worker is probed on its metrics port: ``flowie-healthcheck --port-env FLOWIE_WORKER_METRICS_PORT
--path /metrics``.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-env", default="FLOWIE_PORT", help="variable holding the port (default FLOWIE_PORT)")
    parser.add_argument("--default-port", type=int, default=8000, help="port when the variable is unset")
    parser.add_argument("--path", default="/healthz", help="path to GET (default /healthz)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    port = int(os.environ.get(args.port_env) or args.default_port)
    url = f"http://127.0.0.1:{port}{args.path}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 (fixed scheme)
            ok = 200 <= response.status < 300
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    if not ok:
        sys.stderr.write(f"unhealthy: {url}: HTTP {response.status}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
