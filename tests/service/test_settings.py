"""One settings object: every field is a FLOWIE_* variable and a flag of the same name; unsafe
production settings are refused with a message that says what to set."""

from __future__ import annotations

import argparse

import pytest

from service.settings import (
    Settings,
    SettingsError,
    add_settings_arguments,
    load_settings,
    settings_from_args,
    torch_compile_stages,
    warmup_sizes,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("FLOWIE_"):
            monkeypatch.delenv(name)


def test_every_field_is_an_env_var_and_a_flag_with_a_description():
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for name, info in Settings.model_fields.items():
        assert info.description, name
        flag = "--model" if name == "model_dirs" else "--" + name.replace("_", "-")
        assert flag in flags, name


def test_every_command_prints_its_help():
    """argparse formats help texts with %: a description with a literal % used to crash --help."""
    from service.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"serve", "api", "worker", "enhance"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        assert "[env FLOWIE_" in text or name not in ("serve", "api", "worker"), name
    assert "+11%;" in commands["serve"].format_help()  # a literal % in a description (FLOWIE_HOST_MALLOC)


def test_settings_table_in_the_docs_lists_exactly_the_fields():
    import re
    from pathlib import Path

    table = (Path(__file__).resolve().parents[2] / "docs" / "SETTINGS.md").read_text()
    documented = set(re.findall(r"^\| `FLOWIE_([A-Z0-9_]+)`", table, flags=re.M))
    # Both ways: a field missing from the table, or a documented variable that no field reads.
    assert documented == {name.upper() for name in Settings.model_fields}


def test_env_vars_are_read_and_flags_win(monkeypatch):
    monkeypatch.setenv("FLOWIE_MAX_QUEUE", "7")
    monkeypatch.setenv("FLOWIE_MAX_BATCH", "3")
    settings = settings_from_args(parse(["--max-batch", "5"]))
    assert settings.max_queue == 7 and settings.max_batch == 5


def test_model_dirs_are_comma_separated_or_repeated(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWIE_MODEL_DIRS", f"{tmp_path}/a, {tmp_path}/b")
    assert [p.name for p in load_settings().model_dirs] == ["a", "b"]
    repeated = settings_from_args(parse(["--model", "x", "--model", "y,z"]))
    assert [p.name for p in repeated.model_dirs] == ["x", "y", "z"]


def test_bad_value_names_the_variable_and_the_flag(monkeypatch):
    monkeypatch.setenv("FLOWIE_MAX_BATCH", "zero")
    with pytest.raises(SettingsError, match="FLOWIE_MAX_BATCH / --max-batch"):
        load_settings()


def test_production_without_api_keys_is_refused_unless_allowed():
    with pytest.raises(SettingsError, match="FLOWIE_API_KEYS"):
        load_settings(env="production")
    with pytest.raises(SettingsError, match="shorter than 16"):
        load_settings(env="production", api_keys="short")
    assert load_settings(env="production", allow_unauthenticated=True).env == "production"
    assert load_settings(env="production", api_keys="a" * 32).api_key_values() == ["a" * 32]


def test_api_keys_do_not_show_in_repr():
    settings = load_settings(api_keys="super-secret-key-value-123")
    assert "super-secret-key-value-123" not in repr(settings)


def test_heartbeat_must_fit_twice_in_the_visibility_timeout():
    with pytest.raises(SettingsError, match="FLOWIE_HEARTBEAT_S"):
        load_settings(heartbeat_s=5, visibility_timeout_s=6)


def test_warmup_is_auto_off_or_a_list_of_sizes(monkeypatch):
    assert load_settings().warmup == "auto"
    assert load_settings(warmup="OFF").warmup == "off"
    monkeypatch.setenv("FLOWIE_WARMUP", "512x512, 768x512")
    assert warmup_sizes(load_settings().warmup) == [(512, 512), (768, 512)]
    for bad, why in (("512", "is not HxW"), ("512x", "is not HxW"), ("32x512", "smaller than 64"),
                     ("512x512,big", "is not HxW")):
        with pytest.raises(SettingsError, match=f"FLOWIE_WARMUP.*{why}"):
            load_settings(warmup=bad)


def test_the_control_stream_is_on_by_default_and_can_be_turned_off(monkeypatch):
    """On an NVIDIA H200 (docs/PERF.md, 2026-11-27) it was never slower: 1.08x BFR at batch 1."""
    assert load_settings().control_stream is True
    monkeypatch.setenv("FLOWIE_CONTROL_STREAM", "false")
    assert load_settings().control_stream is False


def test_torch_compile_is_off_on_all_or_a_list_of_stages(monkeypatch):
    assert load_settings().torch_compile == "off" and torch_compile_stages("off") == ()
    monkeypatch.setenv("FLOWIE_TORCH_COMPILE", "true")  # earlier releases took a bool
    assert load_settings().torch_compile == "on"
    assert torch_compile_stages("on") == ("swinir", "cond_encoder", "flow_unet", "vae_decoder")
    assert torch_compile_stages("all") == ("swinir", "cond_encoder", "flow_unet", "vae_decoder")
    assert torch_compile_stages(" Flow_UNet, cond_encoder ") == ("flow_unet", "cond_encoder")
    assert load_settings(torch_compile=False).torch_compile == "off"
    assert load_settings(torch_compile="0").torch_compile == "off"
    with pytest.raises(SettingsError, match=r"FLOWIE_TORCH_COMPILE.*unet is not a stage.*swinir, cond_encoder"):
        load_settings(torch_compile="unet,vae_decoder")
