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


def test_the_settings_page_is_the_text_generated_from_the_settings_object():
    """docs/SETTINGS.md is `python -m service.settings_doc`'s output, to the character."""
    import re

    from service.settings_doc import DOC_PATH, render

    page = DOC_PATH.read_text()
    assert page == render(), "docs/SETTINGS.md is stale: run python -m service.settings_doc"
    documented = re.findall(r"^\| `FLOWIE_([A-Z0-9_]+)`", page, flags=re.M)
    assert documented == [name.upper() for name in Settings.model_fields]  # every field, in order, once


def test_every_setting_has_one_sentence_of_help_without_measurements():
    import re

    for name, field in Settings.model_fields.items():
        text = field.description or ""
        assert text and len(text) <= 200, name
        assert not re.search(r"\d(\.\d+)?x\b|docs/PERF\.md|H200|H100", text), (name, text)


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


def test_torch_compile_is_on_or_off_and_all_still_means_on(monkeypatch):
    assert load_settings().torch_compile is False and load_settings().engine_config().compile_stages == ()
    monkeypatch.setenv("FLOWIE_TORCH_COMPILE", "all")
    assert load_settings().torch_compile is True
    assert load_settings().engine_config().compile_stages == ("swinir", "cond_encoder", "flow_unet", "vae_decoder")
    with pytest.raises(SettingsError, match="FLOWIE_TORCH_COMPILE"):
        load_settings(torch_compile="unet,vae_decoder")


def test_engine_overrides_are_checked_when_the_settings_load(monkeypatch):
    assert load_settings(engine_overrides="tile_batch=4, png_compress_level=6").engine_config().tile_batch == 4
    with pytest.raises(SettingsError, match="FLOWIE_ENGINE_OVERRIDES.*'cuda_graph=off': expected key=value"):
        load_settings(engine_overrides="cuda_graph=off")
    with pytest.raises(SettingsError, match="png_compress_level='12' is not a whole number from 0 to 9"):
        load_settings(engine_overrides="png_compress_level=12")
    with pytest.raises(SettingsError, match="cuda_graphs=on needs a CUDA device"):
        load_settings(engine_overrides="cuda_graphs=on").engine_config()  # the device decides: at resolve time
