"""`python -m bench COMMAND`: the measurement tools, run from a checkout (they are not part of the product).

- `serving`: this system against the model's ceilings (TensorFlow, the chosen runtime), predict and plain RQ;
- `loadtest`: many chat users at once through the conversation, a private Redis and workers;
- `faults`: the load test with one part broken on purpose;
- `fuzz`: mutated pictures through the photo decoder;
- `store`: the bots' SQLite store under a burst;
- `queue-cost`: a photo's CPU in the client, the worker and Redis, with and without hiredis;
- `openvino-streams`: OpenVINO on one stream of all threads against the worker's pass on its streams;
- `sharing`: photo latency under a steady load, alone and beside a retrain on the same machine;
- `training-input`: the training input pipeline against Keras' ImageDataGenerator.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from carbot import logs
from carbot.settings import get_settings


def save_results(results: dict, json_path: Path | None) -> None:
    """Save `results` as JSON at `json_path` when one was given (`--json`), and say so."""
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
        click.echo(f"saved {json_path}")


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def main(verbose: bool) -> None:
    """Measure carbot from outside: ratios side by side in one run, faults, fuzzing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logs.configure(level=logging.DEBUG if verbose else logging.INFO, json_format=False)


@main.command("training-input")
@click.option("--photos", type=int, default=600, show_default=True, help="640x480 JPEGs to read per pipeline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Save results here.")
def training_input(photos: int, json_path: Path | None) -> None:
    """The training input pipeline against Keras' ImageDataGenerator, and training-step throughput, side by side."""
    from bench.training_input import format_table, run_input_benchmark

    results = run_input_benchmark(photos=photos)
    click.echo(format_table(results))
    save_results(results, json_path)


@main.command("store")
@click.option("--senders", type=click.IntRange(2), default=200, show_default=True, help="People at once.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True, help="Bursts per set-up.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Save results here.")
def store(senders: int, rounds: int, json_path: Path | None) -> None:
    """The bots' SQLite store under a burst: write-ahead log against rollback journal, side by side."""
    from bench.store import format_table, run_store_benchmark

    results = run_store_benchmark(senders=senders, rounds=rounds)
    click.echo(format_table(results))
    save_results(results, json_path)


@main.command("serving")
@click.option("--photos", type=int, default=192, show_default=True, help="Photos per measured method.")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--backbone", default="resnet50", show_default=True)
@click.option(
    "--backbone-weights",
    default="synthetic",
    show_default=True,
    help="'synthetic': trained on generated photos first (about 20 minutes, once: cached); 'random'; "
    "or the path of a weights file for the backbone (ImageNet's, say).",
)
@click.option(
    "--phone-every",
    type=click.IntRange(0),
    default=4,
    show_default=True,
    help="One photo in N is a 4032x3024 phone photo sent on Discord (Telegram sends a file's thumbnail); 0: none.",
)
@click.option(
    "--phone-files",
    is_flag=True,
    help="Submit the phone photos as the files themselves, not as the media proxy's copies the Discord bot "
    "fetches (what it classifies when the proxy gives no usable copy).",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save the results here."
)
def serving(
    photos: int,
    image_size: int,
    backbone: str,
    backbone_weights: str,
    phone_every: int,
    phone_files: bool,
    json_path: Path | None,
) -> None:
    """Measure this system against TensorFlow's and the chosen runtime's ceilings, predict and plain RQ."""
    from bench.backbone import default_cache_dir, synthetic_backbone
    from bench.serving import run_benchmark

    if backbone_weights == "synthetic":
        weights = synthetic_backbone(backbone, default_cache_dir())
    elif backbone_weights == "random":
        weights = None
    else:
        weights = Path(backbone_weights)
    results = run_benchmark(
        get_settings(),
        photos=photos,
        image_size=image_size,
        backbone=backbone,
        backbone_weights=weights,
        phone_every=phone_every,
        phone_copies=not phone_files,
    )
    save_results(results, json_path)


@main.command("openvino-streams")
@click.option(
    "--artefact",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A version's directory with an int8 variant (default: build the serving benchmark's model, ~4 minutes).",
)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True, help="Rounds per way, in turns.")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save the results here."
)
def openvino_streams(artefact: Path | None, rounds: int, json_path: Path | None) -> None:
    """OpenVINO int8 on one stream of all threads against the worker's streamed pass, alone and beside a neighbour."""
    from bench.openvino_streams import format_table, run_streams_benchmark

    results = run_streams_benchmark(artefact, rounds=rounds)
    click.echo(format_table(results))
    save_results(results, json_path)


@main.command("queue-cost")
@click.option("--photos", type=click.IntRange(1), default=192, show_default=True, help="Photos sent at once.")
@click.option("--bursts", type=click.IntRange(1), default=5, show_default=True, help="Bursts per round.")
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True, help="Rounds per parser, in turns.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save results here.")
def queue_cost(photos: int, bursts: int, rounds: int, json_path: Path | None) -> None:
    """A photo's CPU in the bots' client, the worker and Redis, with redis-py's C parser and without, side by side."""
    from bench.queue_cost import format_table, run_queue_cost

    results = run_queue_cost(get_settings(), photos=photos, bursts=bursts, rounds=rounds)
    click.echo(format_table(results))
    save_results(results, json_path)


@main.command()
@click.option("--seconds", type=float, default=30.0, show_default=True, help="Steady load per phase, in all.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True, help="Rounds the phases take turns.")
@click.option("--rate", type=float, default=8.0, show_default=True, help="Photos a second.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save results here.")
def sharing(seconds: float, rounds: int, rate: float, json_path: Path | None) -> None:
    """Photo latency under a steady load: alone, beside a retrain, and beside a retrain that gives way."""
    from bench.sharing import run_sharing

    results = run_sharing(get_settings(), seconds=seconds, rounds=rounds, rate=rate)
    save_results(results, json_path)


@main.command()
@click.option("--users", type=click.IntRange(1), default=500, show_default=True, help="Chat users at once.")
@click.option("--photos-per-user", type=click.IntRange(1), default=4, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="`carbot worker` processes.")
@click.option("--queue-limit", type=click.IntRange(1), help="Queued photos beyond which people hear busy.")
@click.option("--timeout-s", type=float, help="A request's deadline (default: setting).")
@click.option("--ramp-s", type=float, default=2.0, show_default=True, help="Users arrive spread over this long.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--database-url", help="Record answers here (a scratch database) instead of a fresh SQLite file.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save results here.")
def loadtest(users: int, photos_per_user: int, workers: int, queue_limit: int | None, timeout_s: float | None,
             ramp_s: float, seed: int, database_url: str | None, json_path: Path | None) -> None:  # fmt: skip
    """Many chat users at once through the conversation, a private Redis and worker processes.

    Prints throughput, latency percentiles, batch sizes, busy replies, errors and lost photos.
    """
    from bench.loadtest import LoadConfig, run_loadtest, save_json

    config = LoadConfig(users=users, photos_per_user=photos_per_user, workers=workers, queue_limit=queue_limit,
                        request_timeout_s=timeout_s, ramp_s=ramp_s, seed=seed)  # fmt: skip
    results = run_loadtest(get_settings(), config, database_url=database_url)
    if json_path:
        save_json(results, json_path)
        click.echo(f"saved {json_path}")
    if results["lost"]:
        sys.exit(1)


@main.command()
@click.option("--scenario", "scenarios", multiple=True, help="worker-sigkill, redis-restart, db-outage, disk-full, "
              "corrupt-model (repeatable; default: all).")  # fmt: skip
@click.option("--users", type=click.IntRange(1), default=100, show_default=True, help="Chat users per scenario.")
@click.option("--photos-per-user", type=click.IntRange(1), default=3, show_default=True)
@click.option("--db-outage-s", type=float, default=20.0, show_default=True, help="How long the database is locked.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save results here.")
def faults(scenarios: tuple[str, ...], users: int, photos_per_user: int, db_outage_s: float,
           json_path: Path | None) -> None:  # fmt: skip
    """The load test with one part broken on purpose; each scenario reports submitted/answered/errors/lost."""
    from bench.faults import SCENARIOS, FaultConfig, run_faults, save_json

    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise click.BadParameter(f"unknown {sorted(unknown)}; known: {', '.join(SCENARIOS)}", param_hint="--scenario")
    config = FaultConfig(users=users, photos_per_user=photos_per_user, db_outage_s=db_outage_s)
    results = run_faults(get_settings(), scenarios or SCENARIOS, config)
    if json_path:
        save_json(results, json_path)
        click.echo(f"saved {json_path}")
    reports = results["scenarios"].values()
    if any(not all(report["checks"].values()) for report in reports if "checks" in report):
        sys.exit(1)


@main.command()
@click.option("--seconds", type=float, default=300, show_default=True, help="How long to fuzz.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path), help="Save failing inputs here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also save results here.")
def fuzz(seconds: float, seed: int, save_dir: Path | None, json_path: Path | None) -> None:
    """Feed mutated pictures to the photo decoder: no crash, no hang, bounded memory per photo."""
    from bench.fuzz import run_fuzz

    results = run_fuzz(seconds, seed=seed, save_dir=save_dir)
    save_results(results, json_path)
    if results["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
