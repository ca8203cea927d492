"""Export: stage modules -> ONNX (``export.onnx``) -> TensorRT plans (``export.tensorrt``).

Both steps are idempotent commands (``flowie export``, ``flowie build-engines``) whose
artefacts are keyed by what makes them valid; the layout is in ``engines.artifacts``.
"""
