"""The converter maps every inference key of the real full-size checkpoints onto our networks.

The manifests list every state-dict key of the official full-size BFR and BSR models (made by
instantiating the official classes). Our full-size networks are built on the meta device, so
this costs no memory.
"""

from __future__ import annotations

import json

import pytest
import torch

from flowie.convert import (
    ConversionReport,
    _stage_configs,
    check_against_modules,
    load_config,
    map_checkpoint,
    parse_config,
)
from flowie.model import build_stages


def manifest_state_dict(path) -> tuple[dict[str, torch.Tensor], dict]:
    manifest = json.loads(path.read_text())
    sd = {k: torch.empty(v["shape"], device="meta") for k, v in manifest["keys"].items()}
    return sd, manifest


@pytest.mark.parametrize("preset, task", [("bfr_v1", "bfr"), ("bsr_v1", "bsr")])
def test_full_size_manifest_maps_onto_our_networks(reference_root, preset, task):
    sd, manifest = manifest_state_dict(reference_root / f"manifest_flowie_{task}_v1.json")
    spec = parse_config(load_config(preset))
    assert spec.task == task
    report = ConversionReport()
    stages = map_checkpoint(sd, spec, report)
    modules = build_stages(_stage_configs(spec), device="meta")
    check_against_modules(stages, modules)  # raises on missing / unexpected / wrong shape

    # Every key the official model needs for inference is consumed by some stage.
    needed = {k for k, v in manifest["keys"].items() if v["needed_for_inference"] is True}
    consumed = sum(len(v) for v in stages.values()) + report.lora_merged * 2
    buffers = {k for k in needed if k.endswith((".attn_mask", ".relative_position_index"))}
    assert consumed == len(needed - buffers), (consumed, len(needed - buffers))
    if task == "bfr":
        assert report.lora_merged == manifest["lora_layers"]
    else:
        assert report.lora_merged == 0


def test_bfr_manifest_param_count_matches_our_networks(reference_root):
    sd, manifest = manifest_state_dict(reference_root / "manifest_flowie_bfr_v1.json")
    modules = build_stages(_stage_configs(parse_config(load_config("bfr_v1"))), device="meta")
    ours = {name: sum(p.numel() for p in m.state_dict().values()) for name, m in modules.items()}
    totals = manifest["totals"]
    assert ours["flow_unet"] == totals["model.diffusion_model"]["elements"] + totals["control_model"]["elements"]
    assert ours["cond_encoder"] == totals["cond_encoder"]["elements"]
    assert ours["vae_decoder"] == totals["first_stage_model[decoder+post_quant_conv]"]["elements"]
    assert ours["swinir"] == totals["preprocess_model"]["parameter_elements"]


@pytest.mark.parametrize("preset, name", [("diffbir_face_v1", "face"), ("diffbir_general_v1", "general")])
def test_diffbir_full_size_manifest_maps_onto_our_networks(reference_root, preset, name):
    """Every key of face_full_v1.ckpt / general_full_v1.ckpt is used or ignored for a stated reason."""
    sd, manifest = manifest_state_dict(reference_root / f"manifest_diffbir_{name}_v1.json")
    spec = parse_config(load_config(preset))
    assert (spec.family, spec.prediction, spec.lora_rank) == ("diffbir", "eps", 0)
    report = ConversionReport()
    stages = map_checkpoint(sd, spec, report)
    check_against_modules(stages, build_stages(_stage_configs(spec), device="meta"))
    used = sum(len(v) for v in stages.values())
    ignored = sum(report.ignored.values())
    assert used + ignored == len(manifest["keys"])  # 100 %: nothing unaccounted for
    assert report.lora_merged == 0
    text_keys = sum(1 for k in manifest["keys"] if k.startswith("cond_stage_model."))
    assert report.ignored["cond_stage_model.* (text encoder; the null context comes from --null-context)"] == text_keys
    totals = manifest["totals"]
    ours = {stage: sum(t.numel() for t in tensors.values()) for stage, tensors in stages.items()}
    assert ours["flow_unet"] == totals["model.diffusion_model"]["elements"] + totals["control_model"]["elements"]
    assert ours["cond_encoder"] == totals["cond_encoder"]["elements"]


def test_general_swinir_manifest_replaces_stage_one(reference_root):
    """general_full_v1.ckpt + --swinir general_swinir_v1.ckpt: every SwinIR key comes from the separate file."""
    from flowie.convert import replace_swinir

    sd, _ = manifest_state_dict(reference_root / "manifest_diffbir_general_v1.json")
    swinir_sd, swinir_manifest = manifest_state_dict(reference_root / "manifest_diffbir_swinir_v1.json")
    swinir_sd = {k: torch.empty(v.shape, device="meta", dtype=torch.float16) for k, v in swinir_sd.items()}
    spec = parse_config(load_config("diffbir_general_v1"))
    report = ConversionReport()
    merged = replace_swinir(sd, swinir_sd, report)
    stages = map_checkpoint(merged, spec, report)
    check_against_modules(stages, build_stages(_stage_configs(spec), device="meta"))
    assert all(v.dtype == torch.float16 for v in stages["swinir"].values())  # the separate file's tensors
    replaced = report.ignored["preprocess_model.* (replaced by the --swinir file)"]
    assert replaced == len(swinir_manifest["keys"])
    buffers = sum(1 for k in swinir_manifest["keys"] if k.endswith((".attn_mask", ".relative_position_index")))
    assert len(stages["swinir"]) == len(swinir_manifest["keys"]) - buffers
