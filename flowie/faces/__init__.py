"""Whole-photo face restoration: detect faces, align them to the FFHQ 512 template, restore the crops
as one batch, paste them back over a restored background.

Modules (import the one you need; this package's ``__init__`` imports nothing, so the torch-free
``weights`` module can be used by the HTTP process):

- ``weights``   where the networks' weights are found (paths only, no torch);
- ``types``     ``Face``: a box, a score and 5 landmarks;
- ``checkpoints`` the strict, tensors-only loader of their state dicts;
- ``mtcnn``     the offline detector (P/R/O-Net cascade);
- ``retinaface`` / ``retinaface_net``  facexlib's detector (ResNet-50 or mobilenet0.25), user-supplied weights;
- ``parsenet``  facexlib's face parser and the paste-back mask made of its parse;
- ``geometry``  alignment and paste-back with the official constants (OpenCV);
- ``restore``   the whole-photo orchestration around a ``flowie.pipeline.Pipeline``.
"""
