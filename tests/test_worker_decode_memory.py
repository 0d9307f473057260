"""The decoding memory of a whole batch is bounded: at most what the single largest allowed photo costs.

A batch of four float TIFFs of 22 megapixels each (the worst kind a person can
send: about 17 bytes a pixel to decode) goes through the worker's own
`BatchClassifier` with four decoding threads, one a photo (more than the worker's
default of one a CPU core on this 2-core machine), in a fresh process whose peak
memory is read back. Decoded side by side they would take about
1.5 GB; the documented bound is one photo at the pixel limit, 24 bytes a pixel.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench.fuzz import memory_bound
from model import Preprocessing

MEASURE = """
import json, resource, sys
from pathlib import Path
from worker import BatchClassifier, ModelSource
source = ModelSource(registry=Path(sys.argv[1]))
classifier = BatchClassifier(source, decode_threads=4)  # every photo could start at once but for the budget
classifier.classify([("warm", open(sys.argv[2] + "/small.jpg", "rb").read())], [3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
photos = [(str(i), open(f"{sys.argv[2]}/{i}.tiff", "rb").read()) for i in range(4)]
report = classifier.classify(photos, [3] * 4)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before, "computed": report.computed}))
"""


def test_a_batch_of_giant_float_tiffs_decodes_within_one_photos_bound(model_registry: Path, tmp_path: Path) -> None:
    # 22 megapixels of float samples in a small, compressible file (the default limit is 50 megapixels).
    for index in range(4):
        pixels = np.tile(np.linspace(-3.0 + index, 40.0, 2048, dtype=np.float32), (10752, 1))
        Image.fromarray(pixels).save(tmp_path / f"{index}.tiff", "TIFF", compression="tiff_adobe_deflate")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "JPEG")
    (tmp_path / "small.jpg").write_bytes(buffer.getvalue())

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_registry), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, check=True,
    )  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["computed"] == 4
    assert measured["growth"] <= memory_bound(Preprocessing()), measured["growth"] / 2**20
