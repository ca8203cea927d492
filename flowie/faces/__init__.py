"""Whole-photo face restoration: detect faces, align them to the FFHQ 512 template, restore the crops
as one batch, paste them back over a restored background.

Modules (import the one you need; this package's ``__init__`` imports nothing, so the torch-free
``weights`` module can be used by the HTTP process):

- ``weights``   where detector weights are found (paths only, no torch);
- ``types``     ``Face``: a box, a score and 5 landmarks;
- ``mtcnn``     the offline detector (P/R/O-Net cascade);
- ``geometry``  alignment and paste-back with the official constants (OpenCV);
- ``restore``   the whole-photo orchestration around a ``flowie.pipeline.Pipeline``.
"""
