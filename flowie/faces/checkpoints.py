"""Loading the face networks' state dicts: only tensors (``weights_only``), every key accounted for."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from flowie.faces.weights import FaceWeightsError

# Multi-GPU training (DataParallel) saves every key under this prefix; facexlib strips it too.
DATA_PARALLEL_PREFIX = "module."
# BatchNorm counters: checkpoints saved by PyTorch before 0.4.1 lack them; BatchNorm itself accepts that.
OPTIONAL_SUFFIX = "num_batches_tracked"
SHOWN_KEYS = 3


def check_torch_file(path: Path) -> None:
    """Refuse a file that is neither a torch zip archive nor a legacy torch pickle, before loading."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise ValueError(f"{Path(path).name} is not a torch state-dict file (it starts with {head!r})")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (torch.load, weights_only) with a ``module.`` prefix stripped."""
    path = Path(path)
    if not path.is_file():
        raise FaceWeightsError(f"{path.name} does not exist where it was looked for")
    check_torch_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated, or objects beyond tensors
        raise ValueError(f"{path.name} is not a readable file of tensors ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict")
    return {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_KEYS])
    return shown + (f" and {len(items) - SHOWN_KEYS} more" if len(items) > SHOWN_KEYS else "")


def load_state(module: nn.Module, path: Path) -> nn.Module:
    """Load ``path`` into ``module`` strictly: a ValueError names the first unexpected, missing or
    misshapen keys. Returns the module in eval mode."""
    state = read_state(path)
    expected = module.state_dict()
    unexpected = [repr(k) for k in state if k not in expected]
    missing = [repr(k) for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    misshapen = [f"{k!r} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = []
    if unexpected:
        problems.append(f"unexpected key {_listed(unexpected)}")
    if missing:
        problems.append(f"missing key {_listed(missing)}")
    if misshapen:
        problems.append(f"wrong shape of {_listed(misshapen)}")
    if problems:
        raise ValueError(f"{Path(path).name} does not fit {type(module).__name__}: {'; '.join(problems)}")
    for key, value in expected.items():
        state.setdefault(key, torch.zeros_like(value))  # only the optional BatchNorm counters remain
    module.load_state_dict(state, strict=True)
    return module.eval()
