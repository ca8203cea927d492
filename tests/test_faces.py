"""Whole-photo faces: MTCNN on real photos, alignment onto the template, paste-back, the orchestration.

Real photos ship in the dev dependencies: scikit-image's astronaut and camera, matplotlib's
grace_hopper. The expected face positions below were read off the photos by eye (a box that holds
the eyes and mouth), not produced by the detector.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from flowie.faces import geometry  # noqa: E402
from flowie.faces.weights import mtcnn_dir  # noqa: E402


def _skimage_photo(name: str) -> np.ndarray:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
        return np.asarray(im.convert("RGB"))


def _hopper() -> np.ndarray:
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


# Photo -> (x1, y1, x2, y2) of a region that must contain both eyes and the mouth, read by eye.
PHOTOS = {
    "astronaut": (_skimage_photo, "astronaut.png", (185, 85, 265, 155)),
    "camera": (_skimage_photo, "camera.png", (220, 135, 262, 190)),
    "grace_hopper": (lambda _: _hopper(), None, (205, 170, 325, 295)),
}


@pytest.fixture(scope="module")
def detector():
    if mtcnn_dir() is None:
        message = "MTCNN weights missing: pip install --no-deps facenet-pytorch==2.6.0"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    from flowie.faces.mtcnn import MTCNN

    return MTCNN.load("cpu")


def _inside(points: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    x1, y1, x2, y2 = box
    return bool(np.all((points[:, 0] >= x1) & (points[:, 0] <= x2) & (points[:, 1] >= y1) & (points[:, 1] <= y2)))


def _template_error(landmarks: np.ndarray) -> np.ndarray:
    """Distance (px) of each landmark from its template point after the alignment."""
    affine = geometry.similarity_to_template(landmarks)
    mapped = np.c_[landmarks, np.ones(5)] @ affine.T
    return np.linalg.norm(mapped - geometry.TEMPLATE, axis=1)


@pytest.mark.parametrize("name", list(PHOTOS))
def test_real_photo_has_one_face_whose_landmarks_align_to_the_template(detector, name):
    load, file, region = PHOTOS[name]
    photo = load(file)
    faces = detector.detect(photo)
    assert len(faces) == 1, [f.as_dict() for f in faces]
    face = faces[0]
    assert face.score >= 0.95
    assert _inside(face.landmarks, region)
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    # A similarity places the 5 points near the template (the camera man turns his head: ~40 px).
    assert _template_error(face.landmarks).max() < 0.1 * geometry.FACE_SIZE


def test_no_face_in_a_landscape_photo(detector):
    assert detector.detect(_skimage_photo("coffee.png")) == []
    assert detector.detect(np.full((300, 400, 3), 128, np.uint8)) == []


def _group_photo() -> np.ndarray:
    """Four real faces tiled 2 x 2 (two of them mirrored), on one canvas."""
    tiles = [_skimage_photo("astronaut.png")[40:240, 120:320], _hopper()[80:380, 110:410],
             _skimage_photo("astronaut.png")[40:240, 120:320][:, ::-1], _hopper()[80:380, 110:410][:, ::-1]]
    tiles = [np.asarray(Image.fromarray(np.ascontiguousarray(t)).resize((260, 260), Image.BICUBIC)) for t in tiles]
    return np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])


def test_every_face_of_a_tiled_group_is_found(detector):
    faces = detector.detect(_group_photo())
    assert len(faces) == 4
    centres = sorted((int(f.landmarks[2, 1] // 260), int(f.landmarks[2, 0] // 260)) for f in faces)
    assert centres == [(0, 0), (0, 1), (1, 0), (1, 1)]  # one nose in each tile


def test_six_people_of_the_lfw_sample_in_a_grid(detector):
    """Six different people (scikit-image's LFW sample: its first 100 images are faces, 25 px gray),
    enlarged to 100 px and set in a 3 x 2 grid: six faces, one per cell."""
    import skimage

    lfw = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    canvas = np.full((280, 400, 3), 120, np.uint8)
    for k, index in enumerate((3, 17, 29, 44, 61, 88)):
        tile = np.asarray(Image.fromarray((lfw[index] * 255).astype(np.uint8)).resize((100, 100), Image.BICUBIC))
        row, col = divmod(k, 3)
        canvas[20 + row * 130:120 + row * 130, 20 + col * 130:120 + col * 130] = tile[:, :, None]
    faces = detector.detect(canvas)
    cells = sorted((int(f.landmarks[2, 1] // 130), int(f.landmarks[2, 0] // 130)) for f in faces)
    assert cells == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]


def test_no_face_in_the_lfw_sample_non_faces(detector):
    import skimage

    lfw = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    canvas = np.full((280, 400, 3), 120, np.uint8)
    for k, index in enumerate((100, 120, 140, 160, 180, 199)):
        tile = np.asarray(Image.fromarray((lfw[index] * 255).astype(np.uint8)).resize((100, 100), Image.BICUBIC))
        row, col = divmod(k, 3)
        canvas[20 + row * 130:120 + row * 130, 20 + col * 130:120 + col * 130] = tile[:, :, None]
    assert detector.detect(canvas) == []


def test_tiny_face_in_a_huge_photo(detector):
    face = np.asarray(Image.fromarray(_hopper()[120:360, 140:380]).resize((60, 60), Image.BICUBIC))
    photo = np.full((1600, 2400, 3), 90, np.uint8)
    photo[1200:1260, 300:360] = face
    faces = detector.detect(photo)
    assert len(faces) == 1
    assert _inside(faces[0].landmarks, (300, 1200, 360, 1260))


def test_face_cut_by_the_image_edge(detector):
    photo = _hopper()[170:, 190:]  # the face's box starts above and left of the photo
    faces = detector.detect(photo)
    assert len(faces) == 1
    crop = geometry.align(photo, faces[0].landmarks).crop
    # Outside the photo the crop is the official grey border.
    assert tuple(crop[5, 5]) == geometry.BORDER_VALUE


def test_grayscale_and_rgba_photos(detector):
    from flowie.imageops import ensure_rgb

    gray = _skimage_photo("camera.png")[:, :, 0]
    rgba = np.dstack([_skimage_photo("astronaut.png"), np.full((512, 512), 255, np.uint8)])
    assert len(detector.detect(ensure_rgb(gray))) == 1
    assert len(detector.detect(ensure_rgb(rgba))) == 1


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _identity_paste(photo: np.ndarray, detector) -> tuple[np.ndarray, np.ndarray]:
    """(photo with each unchanged crop pasted back, mask of the pixels the faces' regions cover)."""
    alignments = [geometry.align(photo, face.landmarks) for face in detector.detect(photo)]
    assert alignments
    pasted = geometry.paste_faces(photo, [a.crop for a in alignments], [a.inverse for a in alignments])
    touched = np.zeros(photo.shape[:2], bool)
    for a in alignments:
        top, bottom, left, right = geometry.face_region(a.inverse, *photo.shape[:2])
        touched[top:bottom, left:right] = True
    return pasted, touched


def test_align_identity_paste_gives_back_the_photo(detector):
    """Pasting the unchanged crop back reproduces the photo over the whole region the face's crop
    covers (the seam included): >= 58 dB for faces the crop enlarges 3-4 times (measured 61-62 dB
    with the Lanczos warps, 47-48 dB with bilinear ones), exact away from the face."""
    for photo in (_skimage_photo("astronaut.png"), _skimage_photo("camera.png")):
        pasted, touched = _identity_paste(photo, detector)
        assert _psnr(pasted[touched], photo[touched]) >= 58
        assert np.array_equal(pasted[~touched], photo[~touched])


def test_identity_paste_of_a_large_face_and_a_group(detector):
    """A 180-px face (the crop enlarges it 1.5 times) and a tiled group: >= 53 dB over the faces'
    regions (measured 56 and 58 dB; two bilinear warps gave 39 and 42 dB); every pixel outside
    them is the photo's own."""
    for photo in (_hopper(), _group_photo()):
        pasted, touched = _identity_paste(photo, detector)
        assert _psnr(pasted[touched], photo[touched]) >= 53
        assert np.array_equal(pasted[~touched], photo[~touched])


TWO_FACES = (geometry.TEMPLATE * 0.5 + np.array([80, 60]), geometry.TEMPLATE * 0.5 + np.array([200, 60]))


def test_paste_back_keeps_the_neighbour_face():
    """A white 'restored' face replaces its own face, not the cheek of a close neighbour (x = 316,
    at its nose's height) that lies inside the face's square crop."""
    photo = np.full((400, 800, 3), 50, np.uint8)
    left, right = TWO_FACES
    inverse = geometry.align(photo, left).inverse
    out = geometry.paste_faces(photo, [np.full((512, 512, 3), 250, np.uint8)], [inverse])
    nose = left[2].astype(int)
    assert out[nose[1], nose[0]].min() >= 245
    assert out[int(right[2, 1]), 316].max() <= 60


def test_official_square_mask_alone_would_overwrite_the_neighbour():
    """Why the ellipse: with the square mask only (a crop mask of ones), that cheek is painted over."""
    photo = np.full((400, 800, 3), 50, np.uint8)
    left, right = TWO_FACES
    inverse = geometry.align(photo, left).inverse
    ones = np.ones((512, 512), np.float32)
    out = geometry.paste_faces(photo, [np.full((512, 512, 3), 250, np.uint8)], [inverse], [ones])
    assert out[int(right[2, 1]), 316].min() >= 200


class IdentityPipeline:
    """A stand-in face model for geometry checks: returns each (padded) image unchanged, at its plan."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def resolve(self, params):
        return params.with_defaults({"upscale": 1.0, "min_side": 0})

    def plan(self, h, w, params):
        from flowie import imageops

        p = self.resolve(params)
        return imageops.plan_resize(h, w, float(p.upscale), int(p.min_side))

    def enhance(self, images, params, seeds=None, keep_restored=False):
        from types import SimpleNamespace

        self.calls.append(len(images))
        return [SimpleNamespace(image=np.array(img), timings={"swinir": 0.0}) for img in images]


def test_restorer_batches_every_face_of_every_photo_once(detector):
    from flowie.faces.restore import FaceRestorer
    from flowie.params import EnhanceParams

    pipe = IdentityPipeline()
    restorer = FaceRestorer(pipe, detector)
    photos = [_group_photo(), _skimage_photo("astronaut.png"), _skimage_photo("coffee.png")]
    results = restorer.enhance(photos, EnhanceParams(upscale=1.0, background="resize"), [1, 2, 3], keep_crops=True)
    assert pipe.calls == [5]  # 4 + 1 + 0 faces in one call
    assert [len(r.faces) for r in results] == [4, 1, 0]
    for photo, result in zip(photos, results, strict=True):
        assert result.image.shape == photo.shape
    # The faceless photo comes back as its background path alone: the bicubic work image (short
    # side 512) brought back to the output size, untouched by any paste.
    from flowie import imageops

    plan = restorer.plan(400, 600, EnhanceParams(upscale=1.0))
    assert plan.work_hw == (512, 768)
    assert np.array_equal(results[2].image, imageops.finish(imageops.prepare(photos[2], plan), plan))
    assert _psnr(results[1].image, photos[1]) > 40
    assert len(results[0].aligned) == 4 and results[0].aligned[0].shape == (512, 512, 3)


def test_restorer_reports_faces_in_output_coordinates(detector):
    from flowie.faces.restore import FaceRestorer
    from flowie.params import EnhanceParams

    photo = _skimage_photo("astronaut.png")
    restorer = FaceRestorer(IdentityPipeline(), detector)
    at_1 = restorer.enhance([photo], EnhanceParams(upscale=1.0, background="resize"), [0])[0]
    at_2 = restorer.enhance([photo], EnhanceParams(upscale=2.0, background="resize"), [0])[0]
    assert at_2.image.shape == (1024, 1024, 3)
    # Landmarks scale with the output (pixel centres kept): within a pixel of twice + 0.5.
    expected = (at_1.faces[0].landmarks + 0.5) * 2 - 0.5
    assert np.abs(at_2.faces[0].landmarks - expected).max() < 1.0


class NegativePipeline(IdentityPipeline):
    """A stand-in background model: answers each image's negative, so its pixels are recognisable."""

    def enhance(self, images, params, seeds=None, keep_restored=False):
        from types import SimpleNamespace

        self.calls.append(len(images))
        return [SimpleNamespace(image=255 - np.array(img), timings={}) for img in images]


def test_background_model_restores_the_area_around_the_faces(detector):
    """background=model: away from the face the answer is the background model's output of the work
    image; the faces are pasted over it; it is the default once a background model exists."""
    from flowie.faces.restore import FaceRestorer
    from flowie.params import EnhanceParams

    photo = _skimage_photo("astronaut.png")
    background = NegativePipeline()
    restorer = FaceRestorer(IdentityPipeline(), detector, background_pipeline=background)
    assert restorer.default_background() == "model"
    (result,) = restorer.enhance([photo], EnhanceParams(upscale=1.0), [0])
    assert background.calls == [1] and len(result.faces) == 1
    far = np.zeros(photo.shape[:2], bool)
    far[400:, :] = True
    assert np.array_equal(result.image[far], 255 - photo[far])
    nose = result.faces[0].landmarks[2].astype(int)
    assert np.abs(result.image[nose[1], nose[0]].astype(int) - photo[nose[1], nose[0]]).max() <= 3
    with pytest.raises(ValueError, match="FLOWIE_BACKGROUND_TASK"):
        FaceRestorer(IdentityPipeline(), detector).enhance([photo], EnhanceParams(background="model"), [0])


def test_parse_masks_decide_what_is_pasted(detector):
    """The ParseNet glue (our network at 64 px, its mask head made to answer one class everywhere)
    over a negative background: all background (class 0) pastes nothing; all skin (class 1) pastes
    the face, so its nose is the photo's again."""
    import torch

    from flowie.faces.parsenet import FaceParser, ParseNet
    from flowie.faces.restore import FaceRestorer
    from flowie.params import EnhanceParams

    photo = _skimage_photo("astronaut.png")
    net = ParseNet()
    parser = FaceParser(net, side=64)
    restorer = FaceRestorer(IdentityPipeline(), detector, background_pipeline=NegativePipeline(), parser=parser)
    for label in (0, 1):
        with torch.no_grad():
            net.out_mask_conv.conv2d.weight.zero_()
            net.out_mask_conv.conv2d.bias.copy_(10.0 * (torch.arange(19) == label))
        (result,) = restorer.enhance([photo], EnhanceParams(upscale=1.0), [0])
        assert len(result.faces) == 1 and "face_parse" in result.timings
        nose = result.faces[0].landmarks[2].astype(int)
        if label == 0:
            assert np.array_equal(result.image, 255 - photo)
        else:
            assert np.abs(result.image[nose[1], nose[0]].astype(int) - photo[nose[1], nose[0]]).max() <= 3


def test_cli_enhance_faces_detect_writes_the_photo_and_the_crops(detector, tiny_model_dir, tmp_path):
    """`flowie enhance PHOTO --faces detect --save-faces DIR` with the tiny reference BFR model; the
    bundled demo model (task restore) is refused for whole photos."""
    from service.cli import main

    photo = tmp_path / "portrait.png"
    Image.fromarray(_skimage_photo("astronaut.png")).resize((256, 256), Image.BICUBIC).save(photo)
    out, faces_dir = tmp_path / "out", tmp_path / "faces"
    assert main(["enhance", str(photo), "-o", str(out), "--model", str(tiny_model_dir), "--faces", "detect",
                 "--save-faces", str(faces_dir), "--seed", "3"]) == 0
    with Image.open(out / "portrait.png") as restored:
        assert restored.size == (256, 256)
    names = sorted(p.name for p in faces_dir.iterdir())
    assert names == ["portrait_00_aligned.png", "portrait_00_restored.png"]
    with Image.open(faces_dir / names[0]) as aligned:
        assert aligned.size == (512, 512)
    assert main(["enhance", str(photo), "-o", str(out), "--faces", "detect"]) == 2
