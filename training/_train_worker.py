"""The `/retrain` job, the admin's decisions and `/rollback`, and the RQ worker that runs them (`carbot train-worker`).

The train worker is the one process that writes the model registry for the bots (they mount it
read-only): besides the runs, it carries out an admin's "promote anyway" or "discard" of a
rejected candidate (`carry_out_decision`, queued by the bot that recorded the decision) and
`/rollback` (`roll_back`).

A run, step by step (`run_retrain`, executed in RQ's work horse, a fresh child process):

1. mark the run "running" and tell its admin;
2. collect the feedback photos from SQL (`collect_feedback`): 👍 keeps the predicted label, a
   correction gives the corrected label, a 👎 without one is not used; per-person caps, and each
   person weighted by how far they agree with others and with the model's confident answers
   (`training._feedback.choose_feedback`); one label per photo hash, the best supported; photos
   no longer in the photo store are skipped;
3. fine-tune the active model on the base dataset and those photos, evaluate candidate and
   active model on the same hold-out, promote the candidate only if the gate passes
   (`training.retrain`), publishing progress each epoch;
4. record counts, both models' metrics and the decision in the run's row, and tell the admin.

Whatever goes wrong ends in `carbot.retrain_runs.fail_run`: an exception in the job, the RQ job
timeout, or the work horse dying (the worker's `work_horse_killed_handler`). A run only ever changes
the registry by `retrain`'s final `activate`, so a failed run leaves the active model serving.

This module is imported by the train worker's parent process, which must stay light: TensorFlow
is imported by `training.retrain` inside the work horse only.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue, Worker, get_current_job
from sqlalchemy import Engine
from sqlmodel import Session, select

from carbot import retrain_runs
from carbot.connections import redis_connection
from carbot.db import Feedback, Prediction, RunStatus, make_engine, utcnow
from carbot.jobs import OwnJobsOnly
from carbot.keys import DECIDE_FUNC, RETRAIN_FUNC, ROLLBACK_FUNC, SERIALIZER
from carbot.photos import PhotoStore
from carbot.retrain_runs import RunEvent
from carbot.settings import Settings, get_settings
from model import Artefact, ModelRegistry
from training._feedback import FeedbackPhoto, FeedbackPolicy, Vote, choose_feedback
from training._sharing import share_machine

log = logging.getLogger(__name__)

BASE_SPLIT_FILE = "base-split.csv"
# The train worker's RQ worker_ttl (RQ's default is 420 s). Its idle dequeue blocks worker_ttl - 15 s, and its
# connection must outlast that: 60 s lets a silently dead network be noticed within about a minute, not seven.
TRAIN_WORKER_TTL_S = 60


def run_retrain(run_id: int) -> dict[str, Any]:
    """The job queued by `/retrain`: one whole run. Returns a short summary (kept as the RQ job's result)."""
    settings = get_settings()
    connection = get_current_job().connection
    engine = make_engine(settings.sql_url)
    try:
        return _execute(settings, connection, engine, run_id)
    except Exception as exc:
        retrain_runs.fail_run(connection, engine, run_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        retrain_runs.release_lock(connection, run_id)
        engine.dispose()


def _execute(settings: Settings, connection: redis.Redis, engine: Engine, run_id: int) -> dict[str, Any]:
    run = retrain_runs.get_run(engine, run_id)
    if run is None:
        raise LookupError(f"retrain run {run_id} is not in the database")
    if run.status in retrain_runs.FINAL_STATUSES:  # failed before it started (its bot could not finish queuing it)
        log.warning("retrain run %s is already %s: nothing to do", run_id, run.status)
        return {"run_id": run_id, "status": run.status}
    # Before TensorFlow starts its threads: they inherit the lowered priority (training._sharing).
    give_way = share_machine(settings, connection)
    # Only now: importing TensorFlow takes seconds that a job with nothing to do, and the jobs behind it, need not wait.
    from training._fine_tune import RetrainProgress, retrain

    started = utcnow()
    active = ModelRegistry(settings.registry_dir).active(verify=False)
    # Recorded now, so a run that fails still says which model it started from.
    retrain_runs.update_run(engine, run_id, status=RunStatus.RUNNING, started_at=started,
                          base_version=active.version if active is not None else None)  # fmt: skip
    retrain_runs.publish(connection, RunEvent.for_run(run, "started"))

    photos = PhotoStore(settings.photo_dir, settings.photo_retention_days)
    feedback, found = collect_feedback(engine, photos, feedback_policy(settings))
    log.info("retrain run %s: %d feedback photos (%s)", run_id, len(feedback), found)

    def on_epoch(progress: RetrainProgress) -> None:
        retrain_runs.publish(connection, RunEvent.for_run(
            run, "progress", epoch=progress.epoch, epochs=progress.epochs, loss=round(progress.loss, 4),
            accuracy=round(progress.accuracy, 4), eta_s=round(progress.eta_s, 1)))  # fmt: skip

    version = retrain_runs.candidate_version(run_id, started)
    outcome = retrain(
        settings.registry_dir,
        feedback,
        version=version,
        base_dataset=settings.base_dataset,
        split_file=settings.data_dir / "retrain" / BASE_SPLIT_FILE,
        config=retrain_config(settings, active),
        on_epoch=on_epoch,
        callbacks=give_way.callbacks(),
    )
    finished = utcnow()
    saved = (settings.registry_dir / version).is_dir()
    status = RunStatus.PROMOTED if outcome.promoted else RunStatus.REJECTED
    retrain_runs.update_run(
        engine,
        run_id,
        status=status,
        base_version=outcome.base_version,
        candidate_version=version if saved else None,
        counts={**outcome.counts, **found},
        active_metrics=outcome.active_metrics,
        candidate_metrics=outcome.candidate_metrics,
        reason=outcome.reason,
        finished_at=finished,
        duration_s=(finished - started).total_seconds(),
    )
    # Ids only: each bot reads the run's record and finds the report picture in its own registry.
    retrain_runs.publish(connection, RunEvent.for_run(run, "finished", status=status))
    log.info("retrain run %s: %s (%s), candidate %s", run_id, status, outcome.reason, version)
    return {"run": run_id, "status": status, "reason": outcome.reason, "candidate": version if saved else None}


def carry_out_decision(run_id: int) -> dict[str, Any]:
    """The job an admin's "promote anyway" or "discard" queues: the bot recorded the decision; this acts on it."""
    settings = get_settings()
    engine = make_engine(settings.sql_url)
    try:
        return apply_decision(ModelRegistry(settings.registry_dir), get_current_job().connection, engine, run_id)
    finally:
        engine.dispose()


def apply_decision(registry: ModelRegistry, connection: redis.Redis, engine: Engine, run_id: int) -> dict[str, Any]:
    """Activate or delete the candidate of run `run_id` as its recorded decision says, and tell the bots.

    If the registry refuses (a damaged candidate, say), the run waits for a decision again and the job fails.
    A run that holds no decision (a forged or repeated job) changes nothing.
    """
    run = retrain_runs.get_run(engine, run_id)
    if run is None or run.status not in retrain_runs.DECISIONS or run.candidate_version is None:
        log.warning("retrain run %s has no decision to carry out", run_id)
        return {"run": run_id, "status": run.status if run is not None else None}
    try:
        if run.status == RunStatus.PROMOTED_BY_ADMIN:
            registry.activate(run.candidate_version)
        elif not registry.discard(run.candidate_version):
            log.warning("run %s: candidate %s is in use, kept on disk", run_id, run.candidate_version)
    except BaseException:
        retrain_runs.update_run(engine, run_id, status=RunStatus.REJECTED, decided_by=None)
        retrain_runs.publish(connection, RunEvent.for_run(run, "decided", status=RunStatus.REJECTED.value))
        raise
    log.info("retrain run %s: %s by %s", run_id, run.status, run.decided_by)
    retrain_runs.publish(connection, RunEvent.for_run(run, "decided", status=run.status))
    return {"run": run_id, "status": run.status, "candidate": run.candidate_version}


def roll_back(not_after: float | None = None) -> dict[str, str | None]:
    """The job `/rollback` queues: activate the previous version again. Returns {"now", "was"}; "now" None if none.

    `not_after` (Redis' clock, seconds): a job started later does nothing ({"expired": "yes"}); the admin
    was told the train worker was busy, and a rollback long after the request would surprise.
    """
    if not_after is not None:
        seconds, micros = get_current_job().connection.time()
        if seconds + micros / 1e6 > not_after:
            return {"now": None, "was": None, "expired": "yes"}
    registry = ModelRegistry(get_settings().registry_dir)
    was = registry.active_version()
    try:
        now = registry.rollback()
    except LookupError:
        return {"now": None, "was": was}
    log.info("rolled back to model version %s (was %s)", now, was)
    return {"now": now, "was": was}


def retrain_config(settings: Settings, active: Artefact | None):
    """Phase 2 as the active model was trained: its recipe's learning rate and unfrozen share, unless set.

    A ResNet50 fine-tuned from ImageNet weights unfreezes its upper 30 %; the demo model, trained from
    random weights, anneals its whole backbone. The artefact's recorded config says which.
    """
    from training._fine_tune import RetrainConfig

    trained = ((active.meta.get("extra") or {}).get("config") or {}) if active is not None else {}
    return RetrainConfig(
        epochs=settings.retrain_epochs,
        learning_rate=settings.retrain_learning_rate or trained.get("learning_rate", RetrainConfig.learning_rate),
        finetune_fraction=trained.get("finetune_fraction", RetrainConfig.finetune_fraction),
    )


def collect_feedback(
    engine: Engine, photos: PhotoStore, policy: FeedbackPolicy | None = None
) -> tuple[list[FeedbackPhoto], dict[str, int]]:
    """The photos people labelled that enter this retrain, once each, with their label and weight; and counts.

    Which votes enter, and with what weight, is `training._feedback.choose_feedback`'s decision
    (per-person caps, trust, agreement). Counts: ``feedback_votes`` (feedback rows read),
    ``feedback_unlabelled`` (👎 without a correction), ``feedback_missing_photo`` (the photo is no
    longer stored: expired or forgotten), and choose_feedback's counts of what it left out.
    """
    statement = select(Feedback.person_id, Prediction.photo_sha256, Prediction.top_k, Feedback.vote,
                       Feedback.correction, Feedback.updated_at
                       ).join(Feedback, Feedback.prediction_id == Prediction.id)  # fmt: skip
    votes: list[Vote] = []
    counts = {"feedback_votes": 0, "feedback_unlabelled": 0, "feedback_missing_photo": 0}
    with Session(engine) as session:
        for person, sha, top_k, vote, correction, updated in session.exec(statement):
            counts["feedback_votes"] += 1
            top1 = top_k[0] if top_k else {}
            model_label, model_probability = top1.get("label"), float(top1.get("probability", 0.0))
            label = correction or (model_label if vote == "up" else None)
            if label is None:
                counts["feedback_unlabelled"] += 1
                continue
            votes.append(Vote(person, sha, label, label != model_label, model_label, model_probability,
                              _aware(updated)))  # fmt: skip
    chosen, left_out = choose_feedback(votes, policy)
    counts.update(left_out)

    found = []
    for photo in chosen:
        path = photos.path(photo.sha256)
        if not path.is_file():
            counts["feedback_missing_photo"] += 1
            continue
        found.append(FeedbackPhoto(sha256=photo.sha256, path=path, label=photo.label, weight=photo.weight))
    return found, counts


def feedback_policy(settings: Settings) -> FeedbackPolicy:
    """The per-person caps the settings give (the trust thresholds are the policy's own)."""
    return FeedbackPolicy(photos_per_person=settings.retrain_photos_per_person,
                          corrections_per_person=settings.retrain_corrections_per_person)  # fmt: skip


def _aware(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; they were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# -- the worker ------------------------------------------------------------------------------------------------


class TrainWorker(OwnJobsOnly, Worker):
    """RQ's forking worker, running nothing but the retrain job, decisions and rollbacks (see `carbot.jobs`)."""

    allowed_funcs = (RETRAIN_FUNC, DECIDE_FUNC, ROLLBACK_FUNC)


def run_train_worker(settings: Settings, redis_url: str, *, burst: bool = False, name: str | None = None) -> bool:
    """Serve the train queue until stopped: RQ's forking worker, so every run trains in a fresh process.

    A fresh work horse per run gives each retrain all of the GPU's memory and returns it
    afterwards; the parent process never imports TensorFlow.
    """
    # RQ's dequeue blocks up to worker_ttl - 15 s: the socket timeout must outlast it.
    connection = redis_connection(redis_url, blocking_s=TRAIN_WORKER_TTL_S - 15)
    engine = make_engine(settings.sql_url)

    def horse_killed(job, retpid: int, ret_val: int, rusage: Any) -> None:
        run_id = (job.kwargs or {}).get("run_id")
        if run_id is not None and job.func_name == RETRAIN_FUNC:
            retrain_runs.fail_run(connection, engine, int(run_id), f"the training process died (exit status {ret_val})")

    worker = TrainWorker(
        [Queue(settings.train_queue, connection=connection, serializer=SERIALIZER)],
        connection=connection,
        serializer=SERIALIZER,
        name=name,
        work_horse_killed_handler=horse_killed,
        worker_ttl=TRAIN_WORKER_TTL_S,
    )
    try:
        return worker.work(burst=burst)
    finally:
        engine.dispose()
