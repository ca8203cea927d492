"""`flowie convert` refuses bad inputs with errors that name the problem."""

from __future__ import annotations

import pickle

import pytest
import torch

from flowie.convert import ConversionError, convert, load_checkpoint


@pytest.fixture(scope="module")
def state_dict(fixture_dir):
    return load_checkpoint(next(fixture_dir.glob("*.ckpt")))


def _convert(fixture_dir, sd, tmp_path, **kwargs):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, path)
    return convert(path, fixture_dir / "model_config.yaml", tmp_path / "out",
                   fixture_dir / "inputs" / "null_context.npy", **kwargs)


def test_missing_keys_are_listed(fixture_dir, state_dict, tmp_path):
    sd = {k: v for k, v in state_dict.items() if "control_model.zero_convs.3" not in k}
    with pytest.raises(ConversionError, match=r"controlnet_down_blocks\.3"):
        _convert(fixture_dir, sd, tmp_path)


def test_unexpected_keys_are_listed(fixture_dir, state_dict, tmp_path):
    sd = dict(state_dict)
    sd["control_model.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="extra_head"):
        _convert(fixture_dir, sd, tmp_path)


def test_unknown_top_level_prefix_is_refused(fixture_dir, state_dict, tmp_path):
    sd = dict(state_dict)
    sd["mystery.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="mystery"):
        _convert(fixture_dir, sd, tmp_path)


def test_shape_mismatch_is_reported(fixture_dir, state_dict, tmp_path):
    sd = dict(state_dict)
    key = "preprocess_model.conv_last.weight"
    sd[key] = torch.zeros(3, 5, 3, 3)
    with pytest.raises(ConversionError, match="shape mismatch.*conv_last"):
        _convert(fixture_dir, sd, tmp_path)


def test_lora_factor_without_partner_is_refused(fixture_dir, state_dict, tmp_path):
    key = next(k for k in state_dict if k.endswith(".lora_up.weight"))
    sd = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(ConversionError, match="LoRA"):
        _convert(fixture_dir, sd, tmp_path)


def test_arbitrary_pickles_are_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ConversionError, match="weights-only"):
        load_checkpoint(path)


def test_wrong_null_context_width_is_refused(fixture_dir, state_dict, tmp_path):
    bad = tmp_path / "ctx.npy"
    import numpy as np

    np.save(bad, np.zeros((1, 77, 1024), dtype=np.float32))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(ConversionError, match="context_dim"):
        convert(path, fixture_dir / "model_config.yaml", tmp_path / "out", bad)


def test_conversion_is_reported_on_the_cli(fixture_dir, tmp_path, capsys):
    from service.cli import main

    rc = main(["convert", str(tmp_path / "nope.ckpt"), "--config", str(fixture_dir / "model_config.yaml"),
               "--null-context", str(fixture_dir / "inputs" / "null_context.npy"), "-o", str(tmp_path / "o")])
    assert rc == 1
    assert "does not exist" in capsys.readouterr().err


def test_official_null_token_file_loads(reference_root):
    from flowie.convert import load_null_context_file

    ctx = load_null_context_file(reference_root / "null_token_1024.pth")
    assert tuple(ctx.shape) == (1, 77, 1024) and ctx.dtype == torch.float32
