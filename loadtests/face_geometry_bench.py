"""Face geometry on the CPU: MTCNN detection + alignment + paste-back of a 1-MP photo (no restoration).

    python loadtests/face_geometry_bench.py [--repeat 5] [--threads 1]

The photo is matplotlib's grace_hopper.jpg enlarged to 1224 x 816 (1.0 MP); the restored face is
the aligned crop itself, so only the geometry is timed. Prints the median of each part in ms.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        photo = np.asarray(im.convert("RGB").resize((1224, 816), Image.BICUBIC))
    detector = MTCNN.load("cpu")
    detector.detect(photo)  # first call: one-time kernel set-up
    parts: dict[str, list[float]] = {"detect": [], "align": [], "paste": [], "total": []}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        faces = detector.detect(photo)
        t1 = time.perf_counter()
        alignments = [geometry.align(photo, face.landmarks) for face in faces]
        t2 = time.perf_counter()
        geometry.paste_faces(photo, [a.crop for a in alignments], [a.inverse for a in alignments])
        t3 = time.perf_counter()
        for name, seconds in (("detect", t1 - t0), ("align", t2 - t1), ("paste", t3 - t2), ("total", t3 - t0)):
            parts[name].append(seconds * 1000)
    print(f"threads {torch.get_num_threads()}; faces {len(faces)}; " + ", ".join(f"{k} {statistics.median(v):.0f} ms" for k, v in parts.items()))


if __name__ == "__main__":
    main()
