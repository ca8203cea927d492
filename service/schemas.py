"""Request and response schemas of the HTTP API (they also write the OpenAPI document).

The enhancement fields are validated here for shape and type (-> 422 with the field named) and
again by `flowie.params.EnhanceParams.validate`, which owns the ranges.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flowie.params import BACKGROUNDS, COLOR_FIXES, FACE_MODES, MAX_STEPS, MAX_UPSCALE, SAMPLERS, TILE_MODES
from service.imaging import OUTPUT_FORMATS

SamplerName = Literal.__getitem__(SAMPLERS)  # type: ignore[attr-defined]
ColorFixName = Literal.__getitem__(COLOR_FIXES)  # type: ignore[attr-defined]
TileName = Literal.__getitem__(TILE_MODES)  # type: ignore[attr-defined]
FaceModeName = Literal.__getitem__(FACE_MODES)  # type: ignore[attr-defined]
BackgroundName = Literal.__getitem__(BACKGROUNDS)  # type: ignore[attr-defined]
OutputFormat = Literal.__getitem__(tuple(OUTPUT_FORMATS))  # type: ignore[attr-defined]

MAX_SEED = 2**63 - 1
FIELD_NAMES = ("task", "upscale", "sampler", "steps", "color_fix", "seed", "tile", "min_side",
               "output_format", "quality", "faces", "background")


class EnhanceFields(BaseModel):
    """The form fields of POST /enhance (absent = the model's default from model.json)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, max_length=64, description="which model: a task listed by GET /models "
                             "(default: the first model configured)")
    upscale: float | None = Field(None, ge=1.0, le=MAX_UPSCALE, description="output size / input size")
    sampler: SamplerName | None = Field(None, description="flow models: mean_value (FlowIE), euler, one_step; "
                                        "diffusion models (DiffBIR): ddpm, ddim, dpm_solver; both: restore_only "
                                        "(stage 1 only). GET /models lists each model's samplers")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="sampler steps (network evaluations)")
    color_fix: ColorFixName | None = Field(None, description="colour correction after decoding")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="noise seed; absent = random, "
                             "always echoed in X-Seed")
    tile: TileName | None = Field(None, description="latent tiling for large images")
    min_side: int | None = Field(None, ge=0, le=4096, description="work size: the short side is "
                                 "enlarged to at least this many pixels before the networks run")
    output_format: OutputFormat = Field("png", description="format of the answer image")
    quality: int | None = Field(None, ge=1, le=100, description="JPEG / WebP quality (PNG ignores it)")
    faces: FaceModeName | None = Field(None, description="face models: detect = find, align and restore every "
                                       "face of a whole photo (the default for task bfr); aligned = the upload "
                                       "is one aligned face")
    background: BackgroundName | None = Field(None, description="whole photos: how the area around the faces "
                                              "is restored: model (the background model, the default when one is "
                                              "configured), swinir (the face model's stage 1) or resize")


class EnhanceJSON(EnhanceFields):
    """POST /enhance as JSON: the image base64-encoded (a `data:` URL prefix is accepted)."""

    image: str = Field(..., min_length=1, description="the image file, base64")


class Links(BaseModel):
    self: str
    result: str


class JobProgress(BaseModel):
    """Where a running job's batch is (reported by the worker a few times a second)."""

    stage: str = Field(..., description="the network running: swinir, cond_encoder, flow_unet, vae_decoder, "
                       "colour_fix (empty before the first)")
    step: int = Field(..., ge=0, description="sampler network evaluations done")
    steps: int = Field(..., ge=0, description="sampler network evaluations in all")
    tiles_done: int = Field(..., ge=0, description="tiles the running network has done in its current pass")
    tiles: int = Field(..., ge=0, description="tiles of that pass (0 when the image is not tiled)")


class JobStatus(BaseModel):
    """GET /jobs/{id}: where a job is."""

    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled", "expired", "deleted"]
    task: str | None = None
    links: Links
    seed: int | None = None
    format: str | None = None
    width: int | None = None
    height: int | None = None
    timings: dict[str, float] | None = None
    progress: JobProgress | None = None


class FaceEntry(BaseModel):
    """One restored face of a whole photo, in output-image pixels."""

    box: list[float] = Field(..., description="x1, y1, x2, y2")
    score: float = Field(..., description="detector probability")
    landmarks: list[list[float]] = Field(..., description="5 (x, y): eyes, nose tip, mouth corners")


class EnhanceResult(BaseModel):
    """POST /enhance with `Accept: application/json`."""

    id: str
    image: str = Field(..., description="the restored image, base64")
    format: str
    width: int
    height: int
    seed: int
    timings: dict[str, float] = Field(..., description="seconds per stage (swinir, cond_encoder, "
                                      "flow_unet, vae_decoder, colour_fix, total) + queue and compute")
    faces: list[FaceEntry] | None = Field(None, description="faces=detect: each restored face, in output pixels")


class ProblemDetails(BaseModel):
    """RFC 9457 problem details (media type application/problem+json)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


class ModelEntry(BaseModel):
    task: str
    name: str
    defaults: dict[str, Any]
    scale_factor: float
    family: str = "flowie"
    samplers: list[str] = []


class ModelsResponse(BaseModel):
    models: list[ModelEntry]
    default_task: str
    limits: dict[str, Any]
    choices: dict[str, list[str]]
    face_detectors: list[str] = Field(default_factory=list, description="face detectors whose weights are installed")
    face_detector: str | None = Field(None, description="the detector whole photos use (FLOWIE_FACE_DETECTOR)")


def enhance_openapi() -> dict[str, Any]:
    """The request body of POST /enhance for the OpenAPI document (read by hand, two media types)."""
    json_schema = EnhanceJSON.model_json_schema()
    form_schema = EnhanceFields.model_json_schema()
    form_schema["properties"] = {"image": {"type": "string", "format": "binary",
                                           "description": "the image file"}, **form_schema["properties"]}
    form_schema["required"] = ["image"]
    form_schema["additionalProperties"] = False
    for schema in (json_schema, form_schema):
        schema.pop("title", None)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form_schema},
                "application/json": {"schema": json_schema},
            },
        }
    }


def problem_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": ProblemDetails.model_json_schema()}}}
