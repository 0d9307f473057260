"""The `carbot` command: one entry point for the worker, the classifier, the bots, the demo and the operator's tools.

Each sub-command reads the settings once, brings up what the embedded defaults
need (a private Redis, a background worker) and tears it down on exit. Heavy
imports (TensorFlow) happen inside the commands that need them, so
`carbot status` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from carbot import health, logs, metrics, services
from carbot.settings import Settings, get_settings

if TYPE_CHECKING:
    from model import ModelRegistry


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug details.")
def main(verbose: bool) -> None:
    """Name the car model in a photo: chat bots on a batched inference queue."""
    # TensorFlow's C++ start-up chatter (oneDNN, CPU features) says nothing a person acts on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logs.configure(level=logging.DEBUG if verbose else logging.INFO, json_format=get_settings().log_format == "json")
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)  # "setup plugin ..." lines say nothing to a person


@main.command()
@click.option("--max-batch", type=int, help="Most photos per forward pass (default: setting, 32).")
@click.option("--max-wait-ms", type=float, help="Longest wait for a batch to fill (default: setting, 5).")
@click.option("--model", "artefact", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Serve this artefact directory instead of the registry's active version.")  # fmt: skip
@click.option("--burst", is_flag=True, help="Quit when the queue is empty.")
@click.option("--name", help="Worker name shown by `rq info` (default: random).")
def worker(max_batch: int | None, max_wait_ms: float | None, artefact: Path | None, burst: bool,
           name: str | None) -> None:  # fmt: skip
    """Serve the classify queue with a resident model, in batches."""
    from worker import run_worker

    try:
        settings = get_settings().with_overrides(max_batch=max_batch, max_wait_ms=max_wait_ms)
    except ValueError as exc:  # pydantic's ValidationError: out of the setting's range
        raise click.UsageError(str(exc)) from None
    with services.redis_url(settings) as url, health.serving(settings, metrics.WORKER, health.worker_checks(url)):
        run_worker(settings, url, artefact=artefact, burst=burst, name=name)


@main.command("train-worker")
@click.option("--burst", is_flag=True, help="Quit when the train queue is empty.")
@click.option("--name", help="Worker name shown by `rq info` (default: random).")
def train_worker(burst: bool, name: str | None) -> None:
    """Serve the train queue: each `/retrain` runs in a fresh child process (run it on a GPU host)."""
    from carbot.db import migrate
    from training import run_train_worker

    settings = get_settings()
    migrate(settings.sql_url)  # a run's row must be readable even if no bot has started yet
    checks = health.queue_and_database_checks(settings)
    with services.redis_url(settings) as url, health.serving(settings, metrics.PLAIN, checks):
        run_train_worker(settings, url, burst=burst, name=name)


@main.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="How many of the latest.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def runs(limit: int, as_json: bool) -> None:
    """Retrain runs, newest first: who asked, data counts, both models' accuracy, decision, duration, error."""
    from carbot.db import make_engine, migrate
    from carbot.retrain_runs import list_runs

    url = get_settings().sql_url
    migrate(url)
    engine = make_engine(url)
    try:
        found = list_runs(engine, limit)
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps([run.model_dump(mode="json") for run in found], indent=2))
        return
    if not found:
        click.echo("No retrain runs yet: an admin starts one with /retrain.")
        return
    click.echo(f"{'run':>4}  {'requested (UTC)':16}  {'by':22} {'status':17} {'active→candidate':23} "
               f"{'overall':>13} {'feedback':>13} {'trained':>8} {'time':>6}")  # fmt: skip
    for run in found:
        click.echo(_run_line(run))
        if run.error:
            click.echo(f"      error: {run.error}")


def _run_line(run) -> str:
    """One row of `carbot runs`: accuracies as active→candidate on the shared hold-out."""

    def pair(part: str) -> str:
        before, after = run.active_metrics.get(f"{part}_accuracy"), run.candidate_metrics.get(f"{part}_accuracy")
        return "—" if before is None or after is None else f"{before:.0%}→{after:.0%}"

    versions = f"{run.base_version or '?'}→{run.candidate_version or '—'}"
    trained = run.counts.get("base_train", 0) + run.counts.get("feedback_train", 0)
    took = "—" if run.duration_s is None else f"{run.duration_s / 60:.1f}m"
    return (f"{run.id:>4}  {run.requested_at:%Y-%m-%d %H:%M}  {run.requested_by[:22]:22} {run.status:17} "
            f"{versions[:23]:23} {pair('overall'):>13} {pair('feedback'):>13} {trained:>8} {took:>6}")  # fmt: skip


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--local", is_flag=True, help="Run the model in this process instead of through the queue.")
@click.option("--top-k", type=click.IntRange(1, 20), default=3, show_default=True)
def classify(images: tuple[Path, ...], as_json: bool, local: bool, top_k: int) -> None:
    """Name the car model in each IMAGE (all submitted at once, batched by the worker)."""
    settings = get_settings()
    photos = [path.read_bytes() for path in images]
    if local:
        outcomes = _classify_locally(settings, photos, top_k)
    else:
        from worker import ClassifyClient, classify_files_sync, worker_running

        with services.redis_url(settings) as url, worker_running(settings, url):
            outcomes = classify_files_sync(lambda: ClassifyClient.from_settings(settings, url), photos, top_k=top_k)
    _print_outcomes(images, outcomes, as_json)
    if any(isinstance(outcome, Exception) for outcome in outcomes):
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(as_json: bool) -> None:
    """Queue depth, workers, the active model version and job counts."""
    from carbot.cli._status import collect_status, format_status

    settings = get_settings()
    report = collect_status(settings, services.running_redis_url(settings))
    click.echo(json.dumps(report, indent=2) if as_json else format_status(report))


@main.command("demo-model")
@click.option("--force", is_flag=True, help="Rebuild it even if it exists.")
def demo_model(force: bool) -> None:
    """Train the demo model on generated photos (about a minute on a CPU) and make it active."""
    settings = get_settings()
    _ensure_demo_model(settings, force=force)


@main.command()
@click.option("--photos", type=int, default=6, show_default=True, help="How many generated photos to offer.")
def demo(photos: int) -> None:
    """Build the demo model if needed, generate a few photos, then open the terminal chat."""
    from bots import run_shell
    from training import SYNTHETIC_CLASSES, synthetic_jpeg

    settings = get_settings()
    _ensure_demo_model(settings, force=False)
    _quiet_logs()
    folder = settings.data_dir / "demo-photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(photos):
        label = SYNTHETIC_CLASSES[index % len(SYNTHETIC_CLASSES)]
        path = folder / f"{index:02d}-{label.lower().replace(' ', '-')}.jpg"
        path.write_bytes(synthetic_jpeg(label, seed=1000 + index))
        paths.append(path)
    banner = "\n".join([
        "carbot terminal chat: type the path of a photo (e.g. one of these), /help, or /quit.",
        *(f"  {path}" for path in paths),
        "Buttons are numbered: type the number to press one; + and - vote on the last answer.",
    ])  # fmt: skip
    run_shell(settings, banner=banner)


@main.command()
def shell() -> None:
    """Talk to the bot in this terminal (standard input may be a pipe)."""
    from bots import run_shell

    _quiet_logs()
    run_shell(get_settings(), banner="carbot terminal chat: type a photo's path, /help, or /quit.")


@main.command()
def telegram() -> None:
    """Run the Telegram bot (TELEGRAM_TOKEN; long polling, or a webhook when TELEGRAM_WEBHOOK_URL is set)."""
    from bots import run_telegram

    settings = get_settings()
    if settings.telegram_token is None:
        raise click.ClickException("Set TELEGRAM_TOKEN to the token @BotFather gave you.")
    with health.serving(settings, metrics.BOTS, health.queue_and_database_checks(settings)):
        run_telegram(settings)


@main.command()
def discord() -> None:
    """Run the Discord bot (DISCORD_TOKEN)."""
    from bots import run_discord

    settings = get_settings()
    if settings.discord_token is None:
        raise click.ClickException("Set DISCORD_TOKEN to your application's bot token.")
    with health.serving(settings, metrics.BOTS, health.queue_and_database_checks(settings)):
        run_discord(settings)


@main.command()
def migrate() -> None:
    """Bring the database schema up to date (DATABASE_URL, or SQLite in the data folder), then exit."""
    from sqlalchemy.engine import make_url

    from carbot.db import migrate as upgrade

    url = get_settings().sql_url
    upgrade(url)
    click.echo(f"database schema up to date: {make_url(url).render_as_string(hide_password=True)}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def stats(as_json: bool) -> None:
    """Predictions, 👍, 👎, corrections and accuracy by feedback, per model version."""
    import asyncio

    from bots import Store

    store = Store.from_settings(get_settings())
    store.migrate()

    async def collect() -> dict:
        try:
            return await store.stats()
        finally:
            await store.close()

    numbers = asyncio.run(collect())
    if as_json:
        click.echo(json.dumps(numbers, indent=2))
        return
    accuracy = numbers["accuracy_by_feedback"]
    click.echo(
        f"{numbers['predictions']} predictions, {numbers['up']} 👍, {numbers['down']} 👎, "
        f"{numbers['corrections']} corrections, accuracy by feedback {'—' if accuracy is None else f'{accuracy:.0%}'}"
    )
    for version, row in sorted(numbers["by_model"].items()):
        click.echo(f"  {version}: {row['predictions']} predictions, {row['up']} 👍, {row['down']} 👎")


@main.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", default="resnet50", show_default=True, help="resnet50, resnet50v2, mobilenetv3small, tiny.")
@click.option("--weights", default="imagenet", show_default=True,
              help="imagenet, none, or the path of a backbone weights file (no download needed).")  # fmt: skip
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--head-epochs", type=int, default=10, show_default=True, help="Phase 1: the head on a frozen backbone.")
@click.option("--finetune-epochs", type=int, default=20, show_default=True, help="Phase 2: upper backbone blocks.")
@click.option("--learning-rate", type=float, default=0.01, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--version", help="The new version's name (default: v<UTC timestamp>).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoints, the split and logs; the same folder resumes an interrupted run.")  # fmt: skip
@click.option(
    "--activate",
    is_flag=True,
    help="Make the new version active when it is saved (never one whose test accuracy is near chance).",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Deterministic TensorFlow kernels: the same seed and data give the same model (slower).",
)
@click.option(
    "--variants/--no-variants",
    default=True,
    show_default=True,
    help="Also export and verify the optimised serving variants (ONNX Runtime, OpenVINO).",
)
def train(data: Path, backbone: str, weights: str, image_size: int, batch_size: int, head_epochs: int,
          finetune_epochs: int, learning_rate: float, seed: int, version: str | None, work_dir: Path | None,
          activate: bool, deterministic: bool, variants: bool) -> None:  # fmt: skip
    """Train a classifier on DATA (a folder per class, or a CSV manifest `path,label`) with the study's recipe."""
    from training import TrainConfig, TrainingFailed
    from training import train as run_training

    config = TrainConfig(
        backbone=backbone,
        image_size=image_size,
        weights=None if weights.lower() == "none" else weights,
        batch_size=batch_size,
        head_epochs=head_epochs,
        finetune_epochs=finetune_epochs,
        learning_rate=learning_rate,
        seed=seed,
        deterministic=deterministic,
    )
    try:
        artefact = run_training(data, get_settings().registry_dir, config, version=version, work_dir=work_dir,
                                activate=activate, variants=variants)  # fmt: skip
    except TrainingFailed as exc:
        raise click.ClickException(str(exc)) from None
    metrics = artefact.metrics
    click.echo(f"saved {artefact.version} in {artefact.path}: test accuracy {metrics.get('test_accuracy', 0):.1%}, "
               f"top-3 {metrics.get('test_top3_accuracy', 0):.1%} (report: {artefact.path / 'report.md'})")  # fmt: skip
    refused = (artefact.meta.get("extra") or {}).get("not_activated")
    if activate and refused:
        raise click.ClickException(f"{artefact.version} was saved but NOT activated: {refused}.")


@main.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--trials", type=click.IntRange(min=1), default=10, show_default=True, help="Most trials to run.")
@click.option("--learning-rates", default="0.001,0.003,0.01,0.03", show_default=True, help="Values to try.")
@click.option("--dropouts", default="0,0.1,0.3,0.5", show_default=True, help="Values to try.")
@click.option("--finetune-fractions", default="0.1,0.3,0.5", show_default=True,
              help="Values to try: the upper share of the backbone unfrozen in phase 2.")  # fmt: skip
@click.option("--backbone", default="resnet50", show_default=True, help="resnet50, resnet50v2, mobilenetv3small, tiny.")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet, none, or a backbone weights file.")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--head-epochs", type=int, default=10, show_default=True, help="Phase 1 of every trial.")
@click.option("--finetune-epochs", type=int, default=20, show_default=True, help="Phase 2 of every trial.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The split, the trials and the result; the same folder continues a search "
                   "(default: <data dir>/tune/<DATA's name>).")  # fmt: skip
@click.option("--train-best", is_flag=True, help="Then train a model version with the best values.")
@click.option("--version", help="With --train-best: the new version's name (default: v<UTC timestamp>).")
@click.option("--activate", is_flag=True, help="With --train-best: make the new version active.")
@click.option(
    "--variants/--no-variants",
    default=True,
    show_default=True,
    help="With --train-best: also export and verify the optimised serving variants (ONNX Runtime, OpenVINO).",
)
def tune(data: Path, trials: int, learning_rates: str, dropouts: str, finetune_fractions: str, backbone: str,
         weights: str, image_size: int, batch_size: int, head_epochs: int, finetune_epochs: int, seed: int,
         work_dir: Path | None, train_best: bool, version: str | None, activate: bool,
         variants: bool) -> None:  # fmt: skip
    """Search learning rate, dropout and fine-tuned depth for DATA (KerasTuner: pip install 'carbot[tune]').

    Every trial is `carbot train`'s recipe, scored on the validation split; the test split is left for the end.
    """
    from training import MissingExtra, SearchSpace, TrainConfig, format_values, keras_tuner, parse_values
    from training import train_best as run_final
    from training import tune as run_search

    try:
        keras_tuner()
        space = SearchSpace(learning_rate=parse_values(learning_rates), dropout=parse_values(dropouts),
                            finetune_fraction=parse_values(finetune_fractions))  # fmt: skip
        config = TrainConfig(backbone=backbone, image_size=image_size,
                             weights=None if weights.lower() == "none" else weights, batch_size=batch_size,
                             head_epochs=head_epochs, finetune_epochs=finetune_epochs, seed=seed)  # fmt: skip
    except (MissingExtra, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    settings = get_settings()
    work_dir = work_dir or settings.data_dir / "tune" / data.stem
    result = run_search(data, work_dir, config, space, max_trials=trials)
    click.echo(f"best hyperparameters (val_accuracy {result.score:.1%}, {len(result.trials)} trials): "
               f"{format_values(result.best)}\nsaved in {result.path}")  # fmt: skip
    if train_best:
        from training import TrainingFailed

        try:
            artefact = run_final(
                result, data, settings.registry_dir, version=version, activate=activate, variants=variants
            )
        except TrainingFailed as exc:
            raise click.ClickException(str(exc)) from None
        accuracy = artefact.metrics.get("test_accuracy", 0)
        click.echo(f"saved {artefact.version} in {artefact.path}: test accuracy {accuracy:.1%} "
                   f"(report: {artefact.path / 'report.md'})")  # fmt: skip
        refused = (artefact.meta.get("extra") or {}).get("not_activated")
        if activate and refused:
            raise click.ClickException(f"{artefact.version} was saved but NOT activated: {refused}.")


@main.command("purge-photos")
def purge_photos() -> None:
    """Delete stored photos older than the retention setting (the bots also do this when they start)."""
    import asyncio

    from bots import Store

    settings = get_settings()
    deleted = asyncio.run(Store.from_settings(settings).purge_photos())
    click.echo(f"deleted {deleted} photos older than {settings.photo_retention_days} days")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def models(as_json: bool) -> None:
    """List the model versions in the registry, oldest first; * marks the active one.

    Under each version, its optimised serving variants and their verification against the Keras model.
    """
    from datetime import UTC

    from model import ArtefactCorrupt, read_variants

    registry = _registry()
    active = registry.active_version()
    rows = []
    for artefact in registry.versions(verify=True):  # corrupt versions are logged and left out
        metrics = artefact.metrics
        rows.append({
            "version": artefact.version,
            "created": artefact.created.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            "backbone": artefact.backbone,
            "image_size": artefact.image_size,
            "labels": artefact.num_classes,
            "test_accuracy": metrics.get("test_accuracy"),
            "test_top3_accuracy": metrics.get("test_top3_accuracy"),
            "active": artefact.version == active,
        })  # fmt: skip
        try:
            manifest = read_variants(artefact.path)
        except ArtefactCorrupt as exc:
            rows[-1]["variants_error"] = str(exc)
            manifest = None
        if manifest is not None:
            rows[-1]["variants_verified_on"] = manifest.verified_on
            rows[-1]["variants"] = {name: {"status": v.status, "reason": v.reason, **v.figures}
                                    for name, v in manifest.variants.items()}  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"No model versions in {registry.root}: run `carbot demo-model` to train one.")
        return

    def percent(value: object) -> str:
        return f"{value:.1%}" if isinstance(value, int | float) else "—"

    click.echo(f"  {'version':<20} {'created (UTC)':<16}  {'backbone':<10} {'size':>5} {'labels':>6} "
               f"{'top-1':>6} {'top-3':>6}")  # fmt: skip
    for row in rows:
        click.echo(
            f"{'*' if row['active'] else ' '} {row['version']:<20} {row['created']:<16}  {row['backbone']:<10} "
            f"{row['image_size']:>5} {row['labels']:>6} {percent(row['test_accuracy']):>6} "
            f"{percent(row['test_top3_accuracy']):>6}"
        )
        _echo_variants(row, percent)
    click.echo(f"{len(rows)} version{'s' if len(rows) != 1 else ''} listed; * marks the active one.")


def _echo_variants(row: dict, percent: Callable[[object], str]) -> None:
    """The lines under a version in `carbot models`: each serving variant, whether it may serve, its figures."""
    if "variants_error" in row:
        click.echo(f"    variants: unreadable ({row['variants_error']}); only TensorFlow serves this version")
    if not row.get("variants"):
        return
    where = row["variants_verified_on"]
    click.echo(f"    serving variants, verified against Keras on {where.get('images')} images ({where.get('source')}):")
    for name, v in row["variants"].items():
        diff = v.get("max_top3_diff")
        figures = (f"agreement {percent(v.get('agreement'))}, max top-3 diff "
                   f"{'—' if diff is None else f'{diff:.4f}'}, accuracy {percent(v.get('accuracy'))}")  # fmt: skip
        serves = "serves" if v["status"] == "verified" else f"kept out of service: {v['reason']}"
        click.echo(f"      {name:<14} {v['status']:<9} {figures if v.get('images') else ''}  {serves}")


@main.command()
@click.argument("version")
def promote(version: str) -> None:
    """Make VERSION the active model, after verifying its checksum.

    Running workers watch the registry and switch to it between batches.
    """
    from model import ArtefactCorrupt

    registry = _registry()
    old = registry.active_version()
    try:
        registry.activate(version)
    except ValueError as exc:  # not a valid version name
        raise click.ClickException(str(exc)) from exc
    except FileNotFoundError as exc:
        raise click.ClickException(
            f"No model version {version!r} in {registry.root}; `carbot models` lists them."
        ) from exc
    except ArtefactCorrupt as exc:
        raise click.ClickException(f"Version {version!r} cannot be promoted: {exc}. "
                                   f"The active version is still {old or 'none'}.") from exc  # fmt: skip
    click.echo(f"{version} is now active (was {old or 'none'})")


@main.command()
def rollback() -> None:
    """Make the previously active model version active again.

    Running workers watch the registry and switch to it between batches.
    """
    from model import ArtefactCorrupt

    registry = _registry()
    old = registry.active_version()
    try:
        version = registry.rollback()
    except LookupError as exc:
        raise click.ClickException("No previous model version to roll back to.") from exc
    except (FileNotFoundError, ArtefactCorrupt) as exc:
        raise click.ClickException(f"Cannot roll back to {registry.previous_version()!r}: {exc}. "
                                   f"The active version is still {old or 'none'}.") from exc  # fmt: skip
    click.echo(f"{version} is now active again (was {old or 'none'})")


# -- helpers -------------------------------------------------------------------------------------------------


def _quiet_logs() -> None:
    # In a chat the terminal belongs to the conversation; warnings still show.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)


def _registry() -> ModelRegistry:
    from model import ModelRegistry  # light: no TensorFlow

    return ModelRegistry(get_settings().registry_dir)


def _ensure_demo_model(settings: Settings, *, force: bool) -> None:
    from model import ModelRegistry

    registry = ModelRegistry(settings.registry_dir)
    if registry.exists("demo") and not force:
        if registry.active_version() is None:
            registry.activate("demo")
        return
    click.echo("Training the demo model on generated photos (about a minute)...")
    from training import build_demo_model

    artefact = build_demo_model(settings.registry_dir, activate=force or registry.active_version() is None)
    click.echo(f"Demo model ready: {artefact.path} (test accuracy {artefact.metrics.get('test_accuracy', 0):.0%}).")


def _classify_locally(settings: Settings, photos: list[bytes], top_k: int) -> list:
    from model import ImageRejected, ModelRegistry, Predictor, load_image
    from worker import Classification, PhotoRejected

    registry = ModelRegistry(settings.registry_dir)
    version = registry.active_version()
    if version is None:
        raise click.ClickException("No active model: run `carbot demo-model` first.")
    predictor = Predictor.from_artefact(registry.path_for(version), max_batch=settings.max_batch)
    outcomes: list = []
    for photo in photos:
        started = time.perf_counter()
        try:
            image = load_image(photo, predictor.preprocessing)
        except ImageRejected as exc:
            outcomes.append(PhotoRejected(str(exc)))
            continue
        answer = predictor.predict(image[None], k=top_k)[0]
        outcomes.append(Classification.from_result("local", {
            "model_version": predictor.version,
            "photo": "",
            "top_k": [{"label": label, "probability": p} for label, p in answer.top_k],
            "timings": {"total_ms": round((time.perf_counter() - started) * 1000, 1)},
            **({"ood": answer.ood.to_dict()} if answer.ood is not None else {}),
        }))  # fmt: skip
    return outcomes


def _print_outcomes(images: tuple[Path, ...], outcomes: list, as_json: bool) -> None:
    if as_json:
        rows = []
        for path, outcome in zip(images, outcomes):
            if isinstance(outcome, Exception):
                rows.append({"file": str(path), "error": type(outcome).__name__, "message": str(outcome)})
            else:
                rows.append({
                    "file": str(path),
                    "model_version": outcome.model_version,
                    "top_k": [{"label": c.label, "probability": c.probability} for c in outcome.top_k],
                    "timings": outcome.timings,
                    "unfamiliar": outcome.ood.unfamiliar if outcome.ood is not None else None,
                })  # fmt: skip
        click.echo(json.dumps(rows, indent=2))
        return
    for path, outcome in zip(images, outcomes):
        click.echo(click.style(str(path), bold=True))
        if isinstance(outcome, Exception):
            click.echo(f"  ✗ {outcome}")
            continue
        if outcome.unfamiliar:
            click.echo("  ? unlike the photos this model was trained on; its best guesses:")
        for rank, candidate in enumerate(outcome.top_k, start=1):
            bar = "█" * round(candidate.probability * 20)
            click.echo(f"  {rank}. {candidate.label:<24} {candidate.probability:6.1%}  {bar}")
        click.echo(click.style(f"  model {outcome.model_version}", dim=True))
