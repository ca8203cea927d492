"""Built-in full-size model configs, written in the official ``target:/params:`` vocabulary.

`bfr_v1` is the official ``configs/model/cldm.yaml`` (blind face restoration);
`bsr_v1` is ``configs/model/cldm_bsr_eval.yaml`` (blind super-resolution: no LoRA, no
cond_encoder, a diffusers-named sd-vae-ft-ema first stage).
`diffbir_face_v1` / `diffbir_general_v1` are DiffBIR v1's ``configs/model/cldm.yaml``
(``model.cldm.ControlLDM``: the same networks, no LoRA, an eps-prediction DDPM); the two
checkpoints share it (the general one is meant to get ``--swinir general_swinir_v1.ckpt``).
"""

from __future__ import annotations

import copy

_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 1024,
    "legacy": False,
}

_SWINIR = {
    "img_size": 64,
    "patch_size": 1,
    "in_chans": 3,
    "embed_dim": 180,
    "depths": [6, 6, 6, 6, 6, 6, 6, 6],
    "num_heads": [6, 6, 6, 6, 6, 6, 6, 6],
    "window_size": 8,
    "mlp_ratio": 2,
    "sf": 8,
    "img_range": 1.0,
    "upsampler": "nearest+conv",
    "resi_connection": "1conv",
    "unshuffle": True,
    "unshuffle_scale": 8,
}

_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

BFR_V1 = {
    "target": "model.cldm.Reflow_ControlLDM",
    "params": {
        "scale_factor": 0.18215,
        "timesteps": 1000,
        "lora_rank": 4,
        "control_stage_config": {"target": "model.cldm.ControlNet", "params": {**_UNET, "hint_channels": 4}},
        "unet_config": {"target": "model.cldm.ControlledUnetModel", "params": dict(_UNET)},
        "first_stage_config": {
            "use_fp16": False,
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "ddconfig": dict(_DDCONFIG)},
        },
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        },
        "preprocess_config": {"target": "model.swinir.SwinIR", "params": dict(_SWINIR)},
    },
}

BSR_V1 = copy.deepcopy(BFR_V1)
BSR_V1["target"] = "model.cldm_bsr.Reflow_ControlLDM"
# The YAML says 64, but the official BSR class never injects LoRA (the call is commented out).
BSR_V1["params"]["lora_rank"] = 64
BSR_V1["params"]["first_stage_config"] = {
    "use_fp16": True,  # -> diffusers AutoencoderKL (sd-vae-ft-ema architecture)
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {"embed_dim": 4, "ddconfig": dict(_DDCONFIG)},
}

DIFFBIR_V1 = copy.deepcopy(BFR_V1)
DIFFBIR_V1["target"] = "model.cldm.ControlLDM"
del DIFFBIR_V1["params"]["lora_rank"]
DIFFBIR_V1["params"].update({"linear_start": 0.00085, "linear_end": 0.012})
del DIFFBIR_V1["params"]["first_stage_config"]["use_fp16"]

PRESETS: dict[str, dict] = {"bfr_v1": BFR_V1, "bsr_v1": BSR_V1, "diffbir_face_v1": DIFFBIR_V1,
                            "diffbir_general_v1": DIFFBIR_V1}
