"""FlowIE: rectified-flow image restoration (CVPR 2024), re-implemented for serving.

This package is pure PyTorch for the networks, but its light modules (``params``,
``stages``, ``modeldir``) import no torch, so the HTTP process can use them.
Import heavy parts explicitly: ``from flowie.pipeline import Pipeline``.
"""

__version__ = "0.1.0"
