"""`bench.backbone`: the serving benchmark's backbone is trained once, cached, and loads at another size."""

from __future__ import annotations

import numpy as np

from bench.backbone import PRETRAIN_SIZE, synthetic_backbone
from model import build_classifier


def test_the_trained_backbone_is_cached_and_serves_at_another_image_size(tmp_path) -> None:
    said: list[str] = []
    path = synthetic_backbone("tiny", tmp_path / "cache", photos=12, epochs=1, say=said.append)
    assert path.is_file() and path.parent == tmp_path / "cache"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing half-written left beside it
    assert any("training tiny" in line for line in said)

    said.clear()
    written = path.stat().st_mtime_ns
    assert synthetic_backbone("tiny", tmp_path / "cache", photos=12, epochs=1, say=said.append) == path
    assert path.stat().st_mtime_ns == written and any("cached" in line for line in said)  # not trained again

    # The benchmark builds its network at its own size on these weights, through the product's loading code:
    # two networks of other sizes built on them hold the same backbone (two random ones would not).
    small, large = (build_classifier(190, backbone="tiny", image_size=size, weights=path) for size in (32, 64))
    assert small.input_shape[1] != PRETRAIN_SIZE
    pairs = zip(small.get_layer("backbone").get_weights(), large.get_layer("backbone").get_weights(), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)
