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
