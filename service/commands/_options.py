"""Flags shared by the commands that build pipelines in their own process (enhance, eval, bench)."""

from __future__ import annotations

import argparse
import os


def add_engine_overrides_argument(parser: argparse.ArgumentParser) -> None:
    """``--engine-overrides``, defaulting to FLOWIE_ENGINE_OVERRIDES, as the service reads it."""
    parser.add_argument("--engine-overrides", default=os.environ.get("FLOWIE_ENGINE_OVERRIDES", ""),
                        help="advanced: key=value list replacing the engine defaults measured for the device "
                             "(as FLOWIE_ENGINE_OVERRIDES; keys in docs/ENGINES.md)")
