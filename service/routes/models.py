"""GET /models: the tasks this service runs, their defaults, the choices and the limits."""

from __future__ import annotations

from fastapi import APIRouter

from flowie.faces.weights import available_detectors
from flowie.params import BACKGROUNDS, COLOR_FIXES, FACE_MODES, SAMPLERS, TILE_MODES
from service.imaging import OUTPUT_FORMATS
from service.routes.deps import SECURED, Service
from service.schemas import ModelEntry, ModelsResponse

router = APIRouter()


@router.get("/models", dependencies=SECURED, summary="Tasks, their defaults, and the limits",
            response_model=ModelsResponse)
async def list_models(service: Service) -> ModelsResponse:
    settings = service.settings
    return ModelsResponse(
        models=[ModelEntry(task=t, name=m.name, defaults=m.defaults, scale_factor=m.scale_factor,
                           family=m.family, samplers=list(m.samplers))
                for t, m in service.models.items()],
        default_task=service.default_task,
        limits={"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                "max_queue": settings.max_queue, "max_batch": settings.max_batch,
                "sync_timeout_s": settings.sync_timeout_s, "job_deadline_s": settings.job_deadline_s,
                "result_ttl_s": settings.result_ttl_s},
        choices={"sampler": list(SAMPLERS), "color_fix": list(COLOR_FIXES), "tile": list(TILE_MODES),
                 "output_format": list(OUTPUT_FORMATS),
                 "input_format": ["png", "jpeg", "webp", "bmp", "tiff", "gif"],
                 "faces": list(FACE_MODES), "background": list(BACKGROUNDS)},
        face_detectors=available_detectors(settings.face_models),
        face_detector=settings.face_detector,
    )
