"""`python -m bench openvino-streams`: OpenVINO on one stream of all threads against its THROUGHPUT streams.

The worker's OpenVINO backend (`model.load_predictor`'s, for an int8 variant) runs a batch that
divides among the CPU's streams as that many parts at once. This measures why, on the variant
the worker serves (openvino-int8 of the benchmark's ResNet50, or of an artefact given with
`--artefact`), in batches of 32: the IR compiled on OpenVINO's default (one stream, every
thread; how the backend ran every batch before) against the worker's own forward pass
(`Predictor.outputs`). Both run in turns, `rounds` rounds each, alone and beside a process that
keeps part of one core busy (as the bots and Redis do on a small server): the rates and their
ratios come from one run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from model import OPENVINO_INT8, variant_model_file

BATCH = 32
# A neighbour busy for `busy` seconds out of every `busy + idle`: none, about 30 % and 50 % of one core.
NEIGHBOURS = {"alone": None, "beside 30 % of a core": (0.003, 0.007), "beside 50 % of a core": (0.005, 0.005)}
_NEIGHBOUR = """
import sys, time
busy, idle = float(sys.argv[1]), float(sys.argv[2])
while True:
    started = time.perf_counter()
    while time.perf_counter() - started < busy:
        pass
    time.sleep(idle)
"""


def run_streams_benchmark(artefact: Path | None = None, *, rounds: int = 3, batches: int = 12) -> dict[str, Any]:
    """Images per second of both ways, beside each neighbour; `artefact`: a version's directory (None: build one)."""
    import openvino as ov

    from model import load_predictor

    with tempfile.TemporaryDirectory(prefix="carbot-streams-") as tmp:
        directory = _artefact_dir(artefact, Path(tmp))
        predictor = load_predictor(directory, runtime=OPENVINO_INT8, max_batch=BATCH)
        if predictor.runtime != OPENVINO_INT8:
            reason = predictor.runtime_choice.reason
            raise SystemExit(f"{directory}: its {OPENVINO_INT8} variant cannot serve here ({reason})")
        core = ov.Core()
        model = core.read_model(str(variant_model_file(directory, OPENVINO_INT8)))
        size = predictor.preprocessing.image_size

        def compiled(batch: int, config: dict[str, str]) -> Any:
            shaped = model.clone()
            shaped.reshape({shaped.inputs[0]: [batch, size, size, 3]})
            return core.compile_model(shaped, "CPU", config)

        one_stream = compiled(BATCH, {})
        streams = int(compiled(1, {"PERFORMANCE_HINT": "THROUGHPUT"}).get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        batch = np.random.default_rng(0).integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
        ways = {
            "one stream, all threads": lambda: one_stream(batch.astype(np.float32)),
            f"{streams} streams": lambda: predictor.outputs(batch),  # the worker's own forward pass
        }
        results: dict[str, Any] = {"streams": streams, "batch": BATCH, "rounds": rounds, "images_per_s": {}}
        for neighbour, duty in NEIGHBOURS.items():
            process = None if duty is None else subprocess.Popen([sys.executable, "-c", _NEIGHBOUR, *map(str, duty)])
            try:
                time.sleep(0.3)
                rates: dict[str, list[float]] = {way: [] for way in ways}
                for _ in range(rounds):
                    for way, run in ways.items():
                        rates[way].append(_rate(run, batches))
            finally:
                if process is not None:
                    process.kill()
                    process.wait()
            results["images_per_s"][neighbour] = {way: round(float(np.median(r)), 1) for way, r in rates.items()}
    return results


def _rate(run: Any, batches: int) -> float:
    run()  # warm
    started = time.perf_counter()
    for _ in range(batches):
        run()
    return BATCH * batches / (time.perf_counter() - started)


def _artefact_dir(artefact: Path | None, tmp: Path) -> Path:
    """`artefact`, or the serving benchmark's model built in `tmp`; either must carry an int8 variant."""
    if artefact is None:
        from bench.backbone import default_cache_dir, synthetic_backbone
        from bench.serving import save_benchmark_model
        from model import ModelRegistry

        weights = synthetic_backbone("resnet50", default_cache_dir())
        registry, _, _ = save_benchmark_model(tmp / "models", backbone="resnet50", image_size=224, weights=weights)
        artefact = ModelRegistry(registry).path_for(ModelRegistry(registry).active_version())
    ir = variant_model_file(artefact, OPENVINO_INT8)
    if not ir.is_file():
        raise SystemExit(f"{artefact} has no {OPENVINO_INT8} variant ({ir})")
    return artefact


def format_table(results: dict[str, Any]) -> str:
    """The rates side by side, with the streams' gain beside each neighbour."""
    ways = list(next(iter(results["images_per_s"].values())))
    lines = [
        f"python -m bench openvino-streams: openvino-int8 in batches of {results['batch']}, {results['streams']} "
        f"streams, median of {results['rounds']} rounds taken in turns",
        f"{'':24} {ways[0]:>24} {ways[1]:>12} {'ratio':>7}",
    ]
    for neighbour, rates in results["images_per_s"].items():
        one, many = rates[ways[0]], rates[ways[1]]
        lines.append(f"{neighbour:24} {one:24.1f} {many:12.1f} {many / one:7.2f}")
    return "\n".join(lines)
