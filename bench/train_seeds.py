"""Train the same unseen synthetic dataset several times with different seeds and print each test accuracy.

A measurement tool, not part of the test suite nor of the shipped packages: it shows whether
training from random weights learns every time (issue 17: some runs stayed at chance).

    PYTHONPATH=. python bench/train_seeds.py --seeds 0 1 2 3 4

The dataset is drawn once (5 synthetic classes x 300 photos, a seed no test or demo uses) and
every run trains on it with the tiny backbone at 64 px, 25 + 5 epochs, as `carbot train` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=25)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--data-seed", type=int, default=1717)
    parser.add_argument("--deterministic", action="store_true", help="train with deterministic kernels")
    args = parser.parse_args()

    from training import SYNTHETIC_CLASSES, TrainConfig, make_synthetic_dataset, train

    with tempfile.TemporaryDirectory(prefix="carbot-seeds-") as tmp:
        data = make_synthetic_dataset(Path(tmp) / "photos", per_class=args.per_class, size=(128, 96),
                                      seed=args.data_seed, classes=SYNTHETIC_CLASSES[: args.classes])  # fmt: skip
        chance = 1 / args.classes
        print(f"dataset: {args.classes} classes x {args.per_class} photos (seed {args.data_seed}); chance {chance:.2f}")
        results = []
        for run, seed in enumerate(args.seeds):
            config = TrainConfig(backbone="tiny", image_size=args.image_size, weights=None,
                                 head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
                                 learning_rate=args.learning_rate, seed=seed)  # fmt: skip
            if args.deterministic and hasattr(config, "deterministic"):
                config.deterministic = True
            started = time.monotonic()
            try:
                artefact = train(data, Path(tmp) / "registry", config, version=f"run{run}-seed{seed}",
                                 work_dir=Path(tmp) / f"work{run}", progress=False)  # fmt: skip
                accuracy = artefact.metrics["test_accuracy"]
                note = ""
            except Exception as exc:  # a run the recipe refuses to keep is a result too
                accuracy, note = float("nan"), f"  ({type(exc).__name__}: {exc})"
            results.append(accuracy)
            print(f"seed {seed}: test accuracy {accuracy:.3f} ({time.monotonic() - started:.0f} s){note}", flush=True)
        worst = min(results)
        print(f"worst {worst:.3f}, best {max(results):.3f}, chance {chance:.2f}")
        return 0 if worst >= 3 * chance else 1


if __name__ == "__main__":
    sys.exit(main())
