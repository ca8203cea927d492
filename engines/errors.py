"""Errors raised by engines and artefact checks (torch-free, so the API process can catch them)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """An engine cannot be built or run; the message says what to do next."""


class ShapeError(EngineError, ValueError):
    """Input tensors do not fit the stage contract (names, ranks, fixed or shared axes, profile)."""


class StaleArtifactError(EngineError):
    """An artefact (ONNX file, TensorRT plan) is missing or was made for something else;
    the message says the command that rebuilds it."""
