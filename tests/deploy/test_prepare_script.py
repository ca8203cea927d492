"""`flowie-prepare` (deploy/docker/prepare.sh) runs convert/export/build-engines only where needed.

The command sequence is checked with a stand-in `flowie` that records its arguments; one test
runs the real `flowie convert` on the reference fixture through the script.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, ROOT, clean_env

SCRIPT = DEPLOY / "docker" / "prepare.sh"


def run_prepare(tmp_path: Path, flowie_body: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run the script with `flowie` = ``flowie_body`` (a shell snippet) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    (bin_dir / "flowie").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(calls))}\n{flowie_body}\n')
    (bin_dir / "flowie").chmod(0o755)
    full_env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
    result = subprocess.run(["sh", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=300,
                            check=False)
    return result, calls.read_text().splitlines() if calls.exists() else []


@pytest.fixture()
def checkpoints(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("bfr.ckpt", "bsr.ckpt", "null_token_1024.pth", "bsr.yaml"):
        (folder / name).write_bytes(b"stand-in")
    return folder


# The stand-in writes model.json for convert, as the real command does.
FAKE_CONVERT = 'case "$1" in convert) shift; while [ "$1" != "-o" ]; do shift; done; mkdir -p "$2"; ' \
               'echo {} > "$2/model.json" ;; esac'


def test_converts_exports_and_builds_fp16_engines_for_each_model(tmp_path: Path, checkpoints: Path) -> None:
    models = tmp_path / "models"
    result, calls = run_prepare(tmp_path, FAKE_CONVERT, FLOWIE_MODEL_DIRS=f"{models}/bfr, {models}/bsr",
                                FLOWIE_PREPARE_CHECKPOINT_DIR=str(checkpoints), FLOWIE_BACKEND="tensorrt",
                                FLOWIE_DTYPE="float16")
    assert result.returncode == 0, result.stderr
    null = checkpoints / "null_token_1024.pth"
    assert calls == [
        f"convert {checkpoints}/bfr.ckpt --config bfr_v1 --null-context {null} -o {models}/bfr --task bfr",
        f"export --model {models}/bfr",
        f"build-engines --model {models}/bfr --fp16",
        f"convert {checkpoints}/bsr.ckpt --config {checkpoints}/bsr.yaml --null-context {null} -o {models}/bsr "
        "--task bsr",
        f"export --model {models}/bsr",
        f"build-engines --model {models}/bsr --fp16",
    ]


def test_existing_model_is_not_converted_again_and_torch_needs_no_export(tmp_path: Path, checkpoints: Path) -> None:
    model = tmp_path / "models" / "bfr"
    model.mkdir(parents=True)
    (model / "model.json").write_text("{}")
    result, calls = run_prepare(tmp_path, "", FLOWIE_MODEL_DIRS=str(model),
                                FLOWIE_PREPARE_CHECKPOINT_DIR=str(checkpoints), FLOWIE_BACKEND="torch")
    assert result.returncode == 0, result.stderr
    assert calls == []
    result, calls = run_prepare(tmp_path, "", FLOWIE_MODEL_DIRS=str(model),
                                FLOWIE_PREPARE_CHECKPOINT_DIR=str(checkpoints), FLOWIE_BACKEND="onnx")
    assert calls == [f"export --model {model}"]


def test_by_default_only_converts_as_the_torch_back_end_needs(tmp_path: Path, checkpoints: Path) -> None:
    models = tmp_path / "models"
    result, calls = run_prepare(tmp_path, FAKE_CONVERT, FLOWIE_MODEL_DIRS=f"{models}/bfr",
                                FLOWIE_PREPARE_CHECKPOINT_DIR=str(checkpoints))
    assert result.returncode == 0, result.stderr
    assert [c.split()[0] for c in calls] == ["convert"]


def test_missing_checkpoint_fails_with_a_message(tmp_path: Path, checkpoints: Path) -> None:
    result, calls = run_prepare(tmp_path, FAKE_CONVERT, FLOWIE_MODEL_DIRS=str(tmp_path / "models" / "faces"),
                                FLOWIE_PREPARE_CHECKPOINT_DIR=str(checkpoints))
    assert result.returncode != 0
    assert f"no {checkpoints}/faces.ckpt" in result.stderr
    assert calls == []


def test_failing_step_stops_the_script(tmp_path: Path, checkpoints: Path) -> None:
    result, calls = run_prepare(tmp_path, 'case "$1" in export) exit 3 ;; esac; ' + FAKE_CONVERT,
                                FLOWIE_MODEL_DIRS=f"{tmp_path}/models/bfr,{tmp_path}/models/bsr",
                                FLOWIE_PREPARE_CHECKPOINT_DIR=str(checkpoints), FLOWIE_BACKEND="tensorrt")
    assert result.returncode != 0
    assert [c.split()[0] for c in calls] == ["convert", "export"]


def test_real_convert_of_the_reference_checkpoint(tmp_path: Path, fixture_dir: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "bfr.ckpt").symlink_to(next(fixture_dir.glob("*.ckpt")))
    (checkpoints / "bfr.yaml").symlink_to(fixture_dir / "model_config.yaml")
    (checkpoints / "null_context.npy").symlink_to(fixture_dir / "inputs" / "null_context.npy")
    model = tmp_path / "models" / "bfr"
    body = f"exec {shlex.quote(sys.executable)} -m service.cli \"$@\""
    env = {"FLOWIE_MODEL_DIRS": str(model), "FLOWIE_PREPARE_CHECKPOINT_DIR": str(checkpoints),
           "FLOWIE_PREPARE_NULL_CONTEXT": str(checkpoints / "null_context.npy"), "FLOWIE_BACKEND": "torch",
           "PYTHONPATH": str(ROOT)}
    result, calls = run_prepare(tmp_path, body, **env)
    assert result.returncode == 0, result.stderr
    assert (model / "model.json").is_file() and (model / "flow_unet.safetensors").is_file()
    again, calls = run_prepare(tmp_path, body, **env)
    assert again.returncode == 0 and "model.json exists: not converting" in again.stderr
