"""Shared fixtures: the reference fixture directory and a tiny converted model.

The reference data lives in ../shared/reference beside the project (not in a user's clone).
Tests that need it skip with a clear reason when it is absent, and fail instead when CI=true.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURE = ROOT.parent / "shared" / "reference" / "tiny_bfr"


def reference_fixture_dir() -> Path:
    return Path(os.environ.get("FLOWIE_REFERENCE_FIXTURE", str(DEFAULT_FIXTURE)))


def require_path(path: Path, what: str) -> Path:
    """Skip (locally) or fail (CI=true) when reference data is missing."""
    if path.exists():
        return path
    message = f"{what} not found at {path}; it sits in ../shared beside the project (set FLOWIE_REFERENCE_FIXTURE)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return require_path(reference_fixture_dir(), "reference fixture")


@pytest.fixture(scope="session")
def reference_root() -> Path:
    return require_path(reference_fixture_dir().parent, "reference data folder")


def _find(fixture: Path, suffixes: tuple[str, ...]) -> Path:
    for suffix in suffixes:
        found = sorted(fixture.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no {suffixes} file in {fixture}")


def convert_fixture(fixture: Path, out: Path, task: str | None = None) -> Path:
    """Convert the fixture's official-format checkpoint with `flowie convert` (the users' code path)."""
    from service.cli import main

    ckpt = _find(fixture, (".ckpt",))
    argv = ["convert", str(ckpt), "--config", str(fixture / "model_config.yaml"),
            "--null-context", str(fixture / "inputs" / "null_context.npy"), "-o", str(out)]
    if task:
        argv += ["--task", task]
    assert main(argv) == 0, "flowie convert failed on the reference fixture"
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(fixture_dir: Path, tmp_path_factory) -> Path:
    """The reference fixture converted to a model directory (task bfr)."""
    return convert_fixture(fixture_dir, tmp_path_factory.mktemp("tiny_bfr_model"))


@pytest.fixture(scope="session")
def tiny_bsr_model_dir(fixture_dir: Path, tmp_path_factory) -> Path:
    """The same weights converted with the official BSR recipe (first-stage hint, one step at t=400)."""
    return convert_fixture(fixture_dir, tmp_path_factory.mktemp("tiny_bsr_model"), task="bsr")


DEFAULT_DIFFBIR_FIXTURE = ROOT.parent / "shared" / "reference" / "tiny_diffbir_v1"


@pytest.fixture(scope="session")
def diffbir_fixture_dir() -> Path:
    """The DiffBIR v1 reference fixture (FLOWIE_DIFFBIR_FIXTURE; same layout as tiny_bfr)."""
    path = Path(os.environ.get("FLOWIE_DIFFBIR_FIXTURE", str(DEFAULT_DIFFBIR_FIXTURE)))
    return require_path(path, "DiffBIR reference fixture (FLOWIE_DIFFBIR_FIXTURE)")


@pytest.fixture(scope="session")
def tiny_diffbir_model_dir(diffbir_fixture_dir: Path, tmp_path_factory) -> Path:
    """The DiffBIR fixture's checkpoint converted with `flowie convert` (family diffbir, task diffbir)."""
    return convert_fixture(diffbir_fixture_dir, tmp_path_factory.mktemp("tiny_diffbir_model"))
