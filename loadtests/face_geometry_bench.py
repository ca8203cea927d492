"""Face geometry on the CPU: detection + alignment + paste-back of a 1-MP photo (no restoration).

    python loadtests/face_geometry_bench.py [--repeat 5] [--threads 1]
        [--detector retinaface_resnet50 --face-models DIR | --random-weights] [--parser]

The photo is matplotlib's grace_hopper.jpg enlarged to 1224 x 816 (1.0 MP); the restored face is
the aligned crop itself, so only the geometry is timed. Alignment and paste-back use MTCNN's face
whichever detector is timed (RetinaFace with --random-weights finds random faces: its time only).
--parser adds ParseNet on the face's crop. Prints the median of each part in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import matplotlib.cbook
import numpy as np
import torch
from PIL import Image

from flowie.faces import geometry
from flowie.faces.mtcnn import MTCNN
from flowie.faces.parsenet import FaceParser, ParseNet
from flowie.faces.retinaface import BACKBONES, RetinaFace
from flowie.faces.retinaface_net import RetinaFaceNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--detector", default="mtcnn", choices=["mtcnn", *BACKBONES])
    parser.add_argument("--face-models", default="", help="directory of facexlib's files (RetinaFace, ParseNet)")
    parser.add_argument("--random-weights", action="store_true",
                        help="RetinaFace / ParseNet with their random initialisation (timing only)")
    parser.add_argument("--parser", action="store_true", help="also time ParseNet on the face's crop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photo = np.asarray(im.convert("RGB").resize((1224, 816), Image.BICUBIC))
    mtcnn = MTCNN.load("cpu")
    faces = mtcnn.detect(photo)
    if args.detector == "mtcnn":
        detector = mtcnn
    elif args.random_weights:
        detector = RetinaFace(RetinaFaceNet(BACKBONES[args.detector]), args.detector)
    else:
        detector = RetinaFace.load(args.detector, args.face_models)
    parse = None
    if args.parser:
        parse = FaceParser(ParseNet()) if args.random_weights else FaceParser.load(args.face_models)
    detector.detect(photo)  # first call: one-time kernel set-up
    parts: dict[str, list[float]] = {"detect": [], "align": [], "parse": [], "paste": [], "total": []}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        found = detector.detect(photo)
        t1 = time.perf_counter()
        alignments = [geometry.align(photo, face.landmarks) for face in faces]
        t2 = time.perf_counter()
        masks = parse([a.crop for a in alignments]) if parse is not None else None
        t3 = time.perf_counter()
        geometry.paste_faces(photo, [a.crop for a in alignments], [a.inverse for a in alignments], masks)
        t4 = time.perf_counter()
        for name, seconds in (("detect", t1 - t0), ("align", t2 - t1), ("parse", t3 - t2), ("paste", t4 - t3),
                              ("total", t4 - t0)):
            parts[name].append(seconds * 1000)
    print(f"{args.detector}; threads {torch.get_num_threads()}; faces found {len(found)}, pasted {len(faces)}; "
          + ", ".join(f"{k} {statistics.median(v):.0f} ms" for k, v in parts.items()))


if __name__ == "__main__":
    main()
