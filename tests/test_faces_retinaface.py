"""RetinaFace and ParseNet: the official checkpoints' layout, the strict loader, priors and decoding,
the parse mask, a detection on a real photo.

The official files (facexlib's detection_Resnet50_Final.pth, detection_mobilenet0.25_Final.pth,
parsing_parsenet.pth) are not available offline: every file here is written by the test with
random values in the official layout, whose key names, shapes and counts are spelled out below from
facexlib's network definitions (torchvision's ResNet-50 through IntermediateLayerGetter, facexlib's
MobileNetV1, FPN, SSH and heads; PSFR-GAN's ParseNet as facexlib builds it for 512 px). Nothing
here claims a detection is right: random weights find random "faces".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cv2")

from flowie.faces import geometry  # noqa: E402
from flowie.faces.weights import FaceWeightsError, available_detectors  # noqa: E402

R50_FILE = "detection_Resnet50_Final.pth"
MOBILE_FILE = "detection_mobilenet0.25_Final.pth"
PARSE_FILE = "parsing_parsenet.pth"

# Key counts, by hand. ResNet-50 without fc: conv1 + bn1 (1 + 5 entries, a BatchNorm has weight,
# bias, running_mean, running_var, num_batches_tracked) + 16 bottlenecks of 3 conv + 3 BN (18) + 4
# downsamples of conv + BN (6) = 318; FPN 5 conv-BN = 30; 3 SSH of 5 conv-BN = 90; 9 heads w + b = 18.
R50_KEYS = 318 + 30 + 90 + 18
# MobileNetV1 x0.25: stage1 = conv-BN (6) + 5 depthwise units of 2 conv-BN (12 each), stage2 = 6
# units, stage3 = 2 units: 6 + 60 + 72 + 24 = 162; then the same FPN, SSH and heads.
MOBILE_KEYS = 162 + 30 + 90 + 18
# ParseNet 512: encoder.0 conv w + b (2); 4 down blocks = shortcut conv w + b (2) + 2 conv-BN (12);
# 10 body blocks of 2 conv-BN (12); 4 up blocks like the down ones; two output convs w + b.
PARSE_KEYS = 2 + 4 * 14 + 10 * 12 + 4 * 14 + 4

R50_SHAPES = {
    "body.conv1.weight": [64, 3, 7, 7],
    "body.bn1.running_var": [64],
    "body.layer1.0.downsample.0.weight": [256, 64, 1, 1],
    "body.layer2.0.conv2.weight": [128, 128, 3, 3],
    "body.layer3.5.bn3.weight": [1024],
    "body.layer4.2.conv3.weight": [2048, 512, 1, 1],
    "fpn.output1.0.weight": [256, 512, 1, 1],
    "fpn.output3.0.weight": [256, 2048, 1, 1],
    "fpn.merge1.0.weight": [256, 256, 3, 3],
    "ssh1.conv3X3.0.weight": [128, 256, 3, 3],
    "ssh2.conv5X5_1.0.weight": [64, 256, 3, 3],
    "ssh3.conv7x7_3.1.running_mean": [64],
    "ClassHead.0.conv1x1.weight": [4, 256, 1, 1],
    "BboxHead.2.conv1x1.weight": [8, 256, 1, 1],
    "LandmarkHead.1.conv1x1.weight": [20, 256, 1, 1],
    "LandmarkHead.1.conv1x1.bias": [20],
}
MOBILE_SHAPES = {
    "body.stage1.0.0.weight": [8, 3, 3, 3],
    "body.stage1.1.0.weight": [8, 1, 3, 3],  # depthwise
    "body.stage1.1.3.weight": [16, 8, 1, 1],
    "body.stage2.5.4.running_var": [128],
    "body.stage3.1.3.weight": [256, 256, 1, 1],
    "fpn.output1.0.weight": [64, 64, 1, 1],
    "fpn.output3.0.weight": [64, 256, 1, 1],
    "ssh1.conv3X3.0.weight": [32, 64, 3, 3],
    "ssh1.conv5X5_1.0.weight": [16, 64, 3, 3],
    "ClassHead.2.conv1x1.bias": [4],
    "LandmarkHead.2.conv1x1.weight": [20, 64, 1, 1],
}
PARSE_SHAPES = {
    "encoder.0.conv2d.weight": [64, 3, 3, 3],
    "encoder.1.shortcut_func.conv2d.weight": [128, 64, 3, 3],
    "encoder.1.conv1.norm.norm.running_mean": [128],
    "encoder.4.conv2.conv2d.weight": [256, 256, 3, 3],
    "body.9.conv1.conv2d.weight": [256, 256, 3, 3],
    "decoder.2.shortcut_func.conv2d.weight": [128, 256, 3, 3],
    "decoder.3.conv2.norm.norm.weight": [64],
    "out_mask_conv.conv2d.weight": [19, 64, 3, 3],
    "out_img_conv.conv2d.bias": [3],
}


def _random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in ``module``'s layout: small weights, positive BatchNorm variances."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        else:
            fan_in = max(1, value[0].numel()) if value.ndim > 1 else 16
            state[key] = torch.randn(value.shape, generator=generator) / math.sqrt(fan_in)
    return state


def _check_layout(state: dict[str, torch.Tensor], count: int, shapes: dict[str, list[int]]) -> None:
    assert len(state) == count
    for key, shape in shapes.items():
        assert list(state[key].shape) == shape, key


def _astronaut() -> np.ndarray:
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png") as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def mobile_state() -> dict[str, torch.Tensor]:
    from flowie.faces.retinaface_net import RetinaFaceNet

    return _random_state(RetinaFaceNet("mobilenet0.25"), 1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, mobile_state) -> Path:
    """A face-models directory with a random R50 file (keys under ``module.``, as multi-GPU training
    saved them), a random mobilenet0.25 file and a random ParseNet file."""
    from flowie.faces.parsenet import ParseNet
    from flowie.faces.retinaface_net import RetinaFaceNet

    folder = tmp_path_factory.mktemp("face_models")
    r50 = _random_state(RetinaFaceNet("resnet50"), 0)
    _check_layout(r50, R50_KEYS, R50_SHAPES)
    assert not any(key.startswith("body.fc") for key in r50)
    torch.save({f"module.{k}": v for k, v in r50.items()}, folder / R50_FILE)
    _check_layout(mobile_state, MOBILE_KEYS, MOBILE_SHAPES)
    torch.save(mobile_state, folder / MOBILE_FILE)
    parse = _random_state(ParseNet(), 2)
    _check_layout(parse, PARSE_KEYS, PARSE_SHAPES)
    torch.save(parse, folder / PARSE_FILE)
    return folder


def test_the_official_files_load_through_the_real_loader(models_dir, mobile_state):
    from flowie.faces.parsenet import FaceParser
    from flowie.faces.retinaface import RetinaFace

    r50 = RetinaFace.load("retinaface_resnet50", models_dir)
    saved = torch.load(models_dir / R50_FILE, weights_only=True)
    assert torch.equal(r50.net.state_dict()["body.layer4.2.conv3.weight"], saved["module.body.layer4.2.conv3.weight"])
    mobile = RetinaFace.load("retinaface_mobile0.25", models_dir)
    assert torch.equal(mobile.net.state_dict()["ClassHead.2.conv1x1.bias"], mobile_state["ClassHead.2.conv1x1.bias"])
    parser = FaceParser.load(models_dir)
    assert parser is not None and not parser.net.training


def test_available_detectors_follow_the_files_in_the_directory(models_dir, tmp_path):
    listed = available_detectors(models_dir)
    assert "retinaface_resnet50" in listed and "retinaface_mobile0.25" in listed
    (tmp_path / MOBILE_FILE).write_bytes(b"")
    assert "retinaface_resnet50" not in available_detectors(tmp_path)
    assert "retinaface_mobile0.25" in available_detectors(tmp_path)
    assert not any(name.startswith("retinaface") for name in available_detectors(None))


def _save_and_load(state: dict[str, torch.Tensor], tmp_path: Path) -> str:
    from flowie.faces.retinaface import RetinaFace

    torch.save(state, tmp_path / MOBILE_FILE)
    with pytest.raises(ValueError) as refused:
        RetinaFace.load("retinaface_mobile0.25", tmp_path)
    return str(refused.value)


def test_an_extra_key_is_refused_by_name(mobile_state, tmp_path):
    message = _save_and_load({**mobile_state, "body.fc.weight": torch.zeros(1000, 256)}, tmp_path)
    assert "unexpected key 'body.fc.weight'" in message and MOBILE_FILE in message


def test_a_missing_key_is_refused_by_name(mobile_state, tmp_path):
    state = {k: v for k, v in mobile_state.items() if k != "LandmarkHead.0.conv1x1.bias"}
    assert "missing key 'LandmarkHead.0.conv1x1.bias'" in _save_and_load(state, tmp_path)


def test_a_misshapen_key_is_refused_by_name(mobile_state, tmp_path):
    state = {**mobile_state, "ClassHead.0.conv1x1.weight": torch.zeros(6, 64, 1, 1)}  # 3 anchors, not 2
    assert "'ClassHead.0.conv1x1.weight' [6, 64, 1, 1] (expected [4, 64, 1, 1])" in _save_and_load(state, tmp_path)


def test_batchnorm_counters_may_be_absent(mobile_state, tmp_path):
    """Files saved before PyTorch 0.4.1 carry no num_batches_tracked; BatchNorm accepts that, so do we."""
    from flowie.faces.retinaface import RetinaFace

    torch.save({k: v for k, v in mobile_state.items() if not k.endswith("num_batches_tracked")}, tmp_path / MOBILE_FILE)
    assert RetinaFace.load("retinaface_mobile0.25", tmp_path).name == "retinaface_mobile0.25"


def test_a_missing_file_is_one_sentence_saying_where_to_put_it(tmp_path):
    from flowie.faces.retinaface import RetinaFace

    with pytest.raises(FaceWeightsError) as missing:
        RetinaFace.load("retinaface_resnet50", tmp_path)
    message = str(missing.value)
    assert R50_FILE in message and "FLOWIE_FACE_MODELS" in message and str(tmp_path) not in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence
    with pytest.raises(FaceWeightsError, match="no face-models directory is set"):
        RetinaFace.load("retinaface_mobile0.25", None)


def test_files_that_are_not_plain_tensors_are_refused(tmp_path):
    from flowie.faces.retinaface import RetinaFace

    (tmp_path / MOBILE_FILE).write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a torch state-dict file"):
        RetinaFace.load("retinaface_mobile0.25", tmp_path)
    torch.save({"body.stage1.0.0.weight": torch.zeros(1), "object": Path("x")}, tmp_path / MOBILE_FILE)
    with pytest.raises(ValueError, match="not a readable file of tensors"):
        RetinaFace.load("retinaface_mobile0.25", tmp_path)


def test_prior_counts_and_positions():
    from flowie.faces.retinaface import prior_boxes, prior_count
    from flowie.faces.retinaface_net import RetinaFaceNet

    # 2 anchors per cell of the stride 8, 16 and 32 grids: 640 x 640 -> (80^2 + 40^2 + 20^2) x 2.
    assert prior_count(640, 640) == 16800
    # 100 x 150: ceil -> 13 x 19, 7 x 10, 4 x 5 cells.
    assert prior_count(100, 150) == (13 * 19 + 7 * 10 + 4 * 5) * 2 == 674
    priors = prior_boxes(100, 150).numpy()
    assert priors.shape == (674, 4)
    np.testing.assert_allclose(priors[0], [4 / 150, 4 / 100, 16 / 150, 16 / 100], rtol=1e-6)
    np.testing.assert_allclose(priors[1], [4 / 150, 4 / 100, 32 / 150, 32 / 100], rtol=1e-6)
    # Stride 8, row 1, column 2, second anchor: index (1 * 19 + 2) * 2 + 1.
    np.testing.assert_allclose(priors[43], [2.5 * 8 / 150, 1.5 * 8 / 100, 32 / 150, 32 / 100], rtol=1e-6)
    # The first prior of the stride-16 level follows the 247 stride-8 cells.
    np.testing.assert_allclose(priors[494], [8 / 150, 8 / 100, 64 / 150, 64 / 100], rtol=1e-6)
    # The heads emit one prediction per prior, in that order's count.
    with torch.no_grad():
        boxes, prob, points = RetinaFaceNet("mobilenet0.25").eval()(torch.zeros(1, 3, 100, 150))
    assert boxes.shape == (1, 674, 4) and prob.shape == (1, 674) and points.shape == (1, 674, 10)


def test_decoding_by_hand():
    from flowie.faces.retinaface import decode_boxes, decode_landmarks

    prior = torch.tensor([[0.5, 0.5, 0.2, 0.1]])  # cx, cy, w, h
    # centre + 0.1 * offset * size; size * exp(0.2 * offset): exp(0.2 * 5 ln 2) = 2.
    box = decode_boxes(torch.tensor([[1.0, -2.0, 0.0, 5 * math.log(2)]]), prior)
    np.testing.assert_allclose(box.numpy(), [[0.42, 0.38, 0.62, 0.58]], atol=1e-6)
    points = decode_landmarks(torch.tensor([[1.0, 0, 0, 1, -1, 0, 0, -1, 0, 0]]), prior)
    np.testing.assert_allclose(points.numpy(), [[[0.52, 0.5], [0.5, 0.51], [0.48, 0.5], [0.5, 0.49], [0.5, 0.5]]],
                               atol=1e-6)


def test_the_network_sees_bgr_minus_the_training_mean(mobile_state, tmp_path):
    from flowie.faces.retinaface import RetinaFace

    torch.save(mobile_state, tmp_path / MOBILE_FILE)
    detector = RetinaFace.load("retinaface_mobile0.25", tmp_path)
    seen = []
    detector.net.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    photo = np.zeros((640, 800, 3), np.uint8)
    photo[:] = (10, 20, 30)  # R, G, B; a short side of 640 is not resized
    detector.detect(photo)
    assert seen[0].shape == (1, 3, 640, 800)
    np.testing.assert_allclose(seen[0][0, :, 5, 5].numpy(), [30 - 104, 20 - 117, 10 - 123])


def _largest_overlap(faces) -> float:
    """The largest IoU between two of the faces' boxes (x1, y1, x2, y2)."""
    boxes = np.array([face.box for face in faces])
    x1, y1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0]), np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2, y2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2]), np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / (area[:, None] + area[None, :] - inter)
    return float(iou[~np.eye(len(boxes), dtype=bool)].max()) if len(boxes) > 1 else 0.0


@pytest.mark.parametrize("name", ["retinaface_mobile0.25", "retinaface_resnet50"])
def test_detection_on_a_real_photo_returns_well_formed_faces(models_dir, name):
    """Random weights, so no claim about where the faces are; the class heads' biases are raised so
    that every prior passes the cut and the top-k bound, NMS and scaling back all run."""
    from flowie.faces.retinaface import CONF_THRESHOLD, RetinaFace

    detector = RetinaFace.load(name, models_dir)
    with torch.no_grad():
        for head in detector.net.ClassHead:
            head.conv1x1.bias.copy_(torch.tensor([-20.0, 20.0, -20.0, 20.0]))
    photo = _astronaut()
    faces = detector.detect(photo)
    assert faces
    scores = [face.score for face in faces]
    assert scores == sorted(scores, reverse=True) and min(scores) > CONF_THRESHOLD
    for face in faces:
        assert face.box.shape == (4,) and face.landmarks.shape == (5, 2)
        assert np.isfinite(face.box).all() and np.isfinite(face.landmarks).all()
    # Kept boxes overlap by IoU <= 0.4 (in the detection frame; a uniform scale keeps IoU).
    assert _largest_overlap(faces[:50]) <= 0.4 + 1e-6
    assert geometry.align(photo, faces[0].landmarks).crop.shape == (512, 512, 3)


def test_parser_input_is_rgb_in_minus_one_to_one():
    from flowie.faces.parsenet import parser_input

    crop = np.zeros((512, 512, 3), np.uint8)
    crop[0, 0] = (255, 0, 51)
    x = parser_input([crop])
    assert x.shape == (1, 3, 512, 512)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [1.0, -1.0, 51 / 127.5 - 1], atol=1e-6)


def test_parser_gives_a_mask_per_crop(models_dir):
    """The parser's glue on random weights at 64 px (the network is fully convolutional)."""
    from flowie.faces.parsenet import FaceParser

    parser = FaceParser.load(models_dir)
    parser.side = 64
    crops = [np.full((512, 512, 3), v, np.uint8) for v in (40, 200)]
    labels = parser.labels(crops)
    assert [lab.shape for lab in labels] == [(64, 64)] * 2 and all(lab.min() >= 0 and lab.max() < 19 for lab in labels)
    masks = parser(crops)
    assert [m.shape for m in masks] == [(512, 512)] * 2
    assert all(m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 for m in masks)
    assert FaceParser.load(models_dir.parent) is None  # no parsing_parsenet.pth there: the ellipse


def test_face_mask_keeps_the_official_classes_blurs_and_clears_the_border():
    """Left of column 256 skin (class 1), right of it background: the mask there is a step blurred
    twice by sigma 11, i.e. once by 11 sqrt 2: Phi((255.5 - x) / (11 sqrt 2)), computed with erf."""
    from flowie.faces.parsenet import face_mask

    labels = np.zeros((512, 512), np.int64)
    labels[:, :256] = 1
    mask = face_mask(labels)
    sigma = 11 * math.sqrt(2)
    for x in (230, 250, 256, 262, 280):
        expected = 0.5 * (1 + math.erf((255.5 - x) / (sigma * math.sqrt(2))))
        assert abs(mask[256, x] - expected) < 2e-3, x
    assert mask[:10].max() == 0 and mask[-10:].max() == 0 and mask[:, :10].max() == 0 and mask[:, -10:].max() == 0
    assert mask[11, 100] > 0.99  # the border is cleared after the blur, not before
    # Kept: 1..13 and 15 (hair and earrings too); dropped: 0 background, 14 hat, 16 necklace, 17 neck, 18 cloth.
    for label, kept in ((13, True), (15, True), (10, True), (14, False), (16, False), (17, False), (18, False)):
        value = face_mask(np.full((512, 512), label, np.int64))[256, 256]
        assert value == pytest.approx(1.0 if kept else 0.0, abs=1e-5), label


def test_paste_back_takes_the_minimum_with_the_parse_mask():
    """A white face pasted with a parse mask that is 0 on the crop's top half and 1 below: the top
    stays the photo's, the bottom centre becomes the face."""
    photo = np.full((400, 400, 3), 50, np.uint8)
    landmarks = geometry.TEMPLATE * 0.5 + np.array([72, 72])
    alignment = geometry.align(photo, landmarks)
    white = np.full((512, 512, 3), 255, np.uint8)
    parse = np.zeros((512, 512), np.float32)
    parse[256:] = 1
    pasted = geometry.paste_faces(photo, [white], [alignment.inverse], [parse])
    top_centre, bottom_centre = (72 + 64, 72 + 128), (72 + 200, 72 + 128)  # (row, column) in the photo
    assert tuple(pasted[top_centre]) == (50, 50, 50)
    assert tuple(pasted[bottom_centre]) == (255, 255, 255)
    nothing = geometry.paste_faces(photo, [white], [alignment.inverse], [np.zeros((512, 512), np.float32)])
    assert np.array_equal(nothing, photo)


def test_cli_detects_with_the_retinaface_of_face_models(tiny_model_dir, mobile_state, tmp_path, capsys):
    """`flowie enhance --faces detect --face-detector retinaface_mobile0.25 --face-models DIR`: its class
    heads biased to find nothing, the astronaut comes back with 0 faces (MTCNN finds 1); a detector
    whose file is not in DIR is refused in one sentence."""
    from service.cli import main

    models = tmp_path / "models"
    models.mkdir()
    biased = {**mobile_state, **{f"ClassHead.{k}.conv1x1.bias": torch.tensor([20.0, -20.0, 20.0, -20.0])
                                 for k in range(3)}}
    torch.save(biased, models / MOBILE_FILE)
    photo = tmp_path / "portrait.png"
    Image.fromarray(_astronaut()).resize((128, 128), Image.BICUBIC).save(photo)
    common = ["enhance", str(photo), "-o", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--faces", "detect",
              "--face-models", str(models), "--seed", "1"]
    assert main([*common, "--face-detector", "retinaface_mobile0.25"]) == 0
    assert "portrait: 0 faces" in capsys.readouterr().err
    with Image.open(tmp_path / "out" / "portrait.png") as restored:
        assert restored.size == (128, 128)
    assert main([*common, "--face-detector", "retinaface_resnet50"]) == 2
    assert f"{R50_FILE} is missing from the face-models directory" in capsys.readouterr().err


def test_detection_maps_the_priors_back_to_the_photo(mobile_state, tmp_path):
    """Heads reduced to their biases: only the 512-px anchors of the stride-32 level pass, boxes are
    the priors themselves and the landmarks fixed offsets from their centres. On a 320 x 480 photo
    (detected at 640 x 960) every face is then a 256-px square centred on a (j + 0.5) x 16 px grid,
    and its left eye sits 0.1 x 512 / 2 = 25.6 px left of the centre and 12.8 px above it."""
    from flowie.faces.retinaface import RetinaFace

    state = dict(mobile_state)
    landmark_offsets = [-1.0, -0.5, 1.0, -0.5, 0.0, 0.0, -0.8, 0.6, 0.8, 0.6]
    for level in range(3):
        for head in ("ClassHead", "BboxHead", "LandmarkHead"):
            state[f"{head}.{level}.conv1x1.weight"] = torch.zeros_like(state[f"{head}.{level}.conv1x1.weight"])
        passes = [20.0, -20.0, -20.0, 20.0] if level == 2 else [20.0, -20.0, 20.0, -20.0]  # (bg, face) per anchor
        state[f"ClassHead.{level}.conv1x1.bias"] = torch.tensor(passes)
        state[f"BboxHead.{level}.conv1x1.bias"] = torch.zeros(8)
        state[f"LandmarkHead.{level}.conv1x1.bias"] = torch.tensor(landmark_offsets * 2)
    torch.save(state, tmp_path / MOBILE_FILE)
    detector = RetinaFace.load("retinaface_mobile0.25", tmp_path)
    faces = detector.detect(np.full((320, 480, 3), 90, np.uint8))
    assert faces
    for face in faces:
        x1, y1, x2, y2 = face.box
        assert x2 - x1 == pytest.approx(256, abs=1e-3) and y2 - y1 == pytest.approx(256, abs=1e-3)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        for c in (cx, cy):
            assert (c / 16 - 0.5) == pytest.approx(round(c / 16 - 0.5), abs=1e-4)
        expected = np.array([cx, cy]) + np.array(landmark_offsets).reshape(5, 2) * 0.1 * 256
        np.testing.assert_allclose(face.landmarks, expected, atol=1e-3)
    assert len(faces) > 1 and _largest_overlap(faces) <= 0.4 + 1e-6
