"""Hyperparameter search over the training recipe with KerasTuner (`carbot tune`, the optional ``tune`` extra).

What is searched: the learning rate, the head's dropout and the fine-tuned depth of the
backbone (``finetune_fraction``), each over a list of values (:class:`SearchSpace`); every
other setting comes from the :class:`~training._recipe.TrainConfig` given.

Every trial *is* the recipe, not a copy of it: the photos are checked and split once by
:func:`~training._recipe.prepare_data` (the split kept in ``work_dir/split.csv`` with its
fingerprint, the same file ``carbot train --work-dir`` reuses), then each trial builds the
network with :func:`~training._recipe.build_network`, runs both phases with
:func:`~training._recipe.run_phases` (same preprocessing, augmentation, class weights,
schedules, early stopping) and is scored on the **validation** split. The test split is
never looked at during the search, so the final model's test metrics stay honest.

KerasTuner's random search picks the trials; its state lives in ``work_dir/tuner``, so an
interrupted search run again with the same ``work_dir`` keeps its finished trials (an
interrupted trial starts again from its last epoch). The outcome goes to
``work_dir/best_hyperparameters.json``; :func:`train_best` trains the final model with
the best values through :func:`~training._recipe.train`, on the same split.

KerasTuner is imported only when a search starts: without it, :func:`tune` raises
:class:`MissingExtra`, whose message says how to install it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import keras

from model import Artefact
from training._dataset import load_split, save_split
from training._recipe import (
    CHECKPOINT_FILE,
    HEAD,
    SPLIT_FILE,
    PreparedData,
    RunState,
    TrainConfig,
    build_network,
    predict_scores,
    prepare_data,
    reporter,
    run_phases,
    train,
)

RESULT_FILE = "best_hyperparameters.json"
TUNER_DIR = "tuner"
PROJECT = "search"
IDENTITY_FILE = "search.json"
OBJECTIVE = "val_accuracy"  # maximised; ties go to the lower val_loss
INSTALL_HINT = "pip install 'carbot[tune]'"


class MissingExtra(ImportError):
    """KerasTuner, the optional ``tune`` extra, is not installed."""


@dataclass(frozen=True)
class SearchSpace:
    """The values tried for each hyperparameter (names as in :class:`TrainConfig`)."""

    learning_rate: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    dropout: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)
    finetune_fraction: tuple[float, ...] = (0.1, 0.3, 0.5)

    def __post_init__(self) -> None:
        for name, values in self.items():
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name}: give one or more distinct values, not {values}")
        if min(self.learning_rate) <= 0:
            raise ValueError(f"learning rates must be > 0, not {self.learning_rate}")
        if not all(0.0 <= value < 1.0 for value in self.dropout):
            raise ValueError(f"dropout values must be in [0, 1), not {self.dropout}")
        if not all(0.0 <= value <= 1.0 for value in self.finetune_fraction):
            raise ValueError(f"finetune_fraction values must be in [0, 1], not {self.finetune_fraction}")

    def items(self) -> list[tuple[str, tuple[float, ...]]]:
        return [(name, tuple(values)) for name, values in asdict(self).items()]

    @property
    def size(self) -> int:
        """How many distinct combinations there are."""
        size = 1
        for _, values in self.items():
            size *= len(values)
        return size


@dataclass
class TuneResult:
    """What a search found; also written as JSON to :attr:`path`."""

    best: dict[str, float]  # hyperparameter name -> best value
    score: float  # the best trial's validation accuracy
    config: TrainConfig  # the base config with the best values in it
    trials: list[dict[str, Any]]  # every trial: id, status, hyperparameters, score, metrics
    path: Path
    work_dir: Path
    data_fingerprint: str
    artefact: Artefact | None = field(default=None, repr=False)  # set by train_best


def keras_tuner() -> Any:
    """The ``keras_tuner`` module, or :class:`MissingExtra` saying how to install it."""
    try:
        import keras_tuner as kt
    except ImportError as exc:
        raise MissingExtra(
            "carbot tune needs KerasTuner, which is an optional extra: "
            f"{INSTALL_HINT} (in a checkout: pip install -e '.[ml,tune]')."
        ) from exc
    return kt


def tune(
    data: Path,
    work_dir: Path,
    config: TrainConfig,
    space: SearchSpace | None = None,
    *,
    max_trials: int = 10,
    progress: bool = True,
) -> TuneResult:
    """Search `space` around `config` on `data` (a folder per class or a CSV manifest); return the best values.

    At most `max_trials` trials (and no more than the space has combinations). Running again
    with the same `work_dir` continues the same search; another config, space or data there
    is refused rather than mixed in.
    """
    kt = keras_tuner()  # before any work: without the extra there is nothing to do
    space = space or SearchSpace()
    if max_trials < 1:
        raise ValueError(f"max_trials must be at least 1, not {max_trials}")
    data, work_dir = Path(data), Path(work_dir)
    say = reporter("tune", progress)

    prepared = prepare_data(data, work_dir, config, say)
    _check_identity(work_dir / TUNER_DIR / IDENTITY_FILE, config, space, prepared.split.fingerprint)
    trials = min(max_trials, space.size)
    say(f"searching {trials} of {space.size} combinations: " + ", ".join(f"{k} {list(v)}" for k, v in space.items()))

    hyperparameters = kt.HyperParameters()
    for name, values in space.items():
        hyperparameters.Choice(name, list(values))
    tuner = _recipe_tuner_class(kt)(
        prepared=prepared,
        base=config,
        say=say,
        fit_verbose=2 if progress else 0,
        hyperparameters=hyperparameters,
        tune_new_entries=False,
        objective=kt.Objective(OBJECTIVE, direction="max"),
        max_trials=trials,
        seed=config.seed,
        directory=str(work_dir / TUNER_DIR),
        project_name=PROJECT,
    )
    tuner.search(verbose=1 if progress else 0)

    records = sorted((_trial_record(trial) for trial in tuner.oracle.trials.values()), key=lambda r: r["trial_id"])
    failed = [record for record in records if record["status"] not in ("COMPLETED", "RUNNING")]
    for record in failed:
        say(f"trial {record['trial_id']} {record['status'].lower()}: {record.get('message', '').strip()[-500:]}")
    completed = [record for record in records if record["status"] == "COMPLETED" and record["score"] is not None]
    if not completed:
        raise RuntimeError(f"no trial of the search in {work_dir / TUNER_DIR} completed; see the messages above")
    # Small validation sets tie often: the lower validation loss, then the earlier trial, decides.
    best_record = min(completed, key=lambda r: (-r["score"], r["metrics"].get("val_loss", float("inf")), r["trial_id"]))
    best = {name: best_record["hyperparameters"][name] for name, _ in space.items()}
    result = TuneResult(
        best=best,
        score=best_record["score"],
        config=replace(config, **best),
        trials=records,
        path=work_dir / RESULT_FILE,
        work_dir=work_dir,
        data_fingerprint=prepared.split.fingerprint,
    )
    _write_result(result, data, space)
    say(f"best {OBJECTIVE} {result.score:.3f}: {format_values(best)} (saved in {result.path})")
    return result


def train_best(
    result: TuneResult,
    data: Path,
    registry_root: Path,
    *,
    version: str | None = None,
    activate: bool = False,
    progress: bool = True,
    variants: bool = True,
) -> Artefact:
    """Train the final model with the best values through :func:`~training._recipe.train`, on the search's split.

    Its work dir is ``<search work dir>/best-<config hash>`` (the search's split saved there too),
    so an interrupted final run resumes like any other. `variants` is `train`'s: with it the version
    also gets its optimised serving variants.
    """
    digest = hashlib.sha256(json.dumps(result.config.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    final_dir = result.work_dir / f"best-{digest}"
    final_dir.mkdir(parents=True, exist_ok=True)
    if not (final_dir / SPLIT_FILE).exists():
        # Written again rather than copied: its paths are relative to the file's own folder.
        save_split(load_split(result.work_dir / SPLIT_FILE), final_dir / SPLIT_FILE)
    artefact = train(
        data,
        registry_root,
        result.config,
        version=version,
        work_dir=final_dir,
        activate=activate,
        progress=progress,
        variants=variants,
        extra={"tuned": {"best": result.best, "val_accuracy": result.score, "search": str(result.path)}},
    )
    result.artefact = artefact
    return artefact


def format_values(values: dict[str, float]) -> str:
    return " ".join(f"{name}={value:g}" for name, value in values.items())


def parse_values(text: str) -> tuple[float, ...]:
    """``"0.001,0.01"`` -> ``(0.001, 0.01)``; for the command line's lists of values."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected numbers separated by commas, not {text!r}") from None


# --------------------------------------------------------------------------


def _recipe_tuner_class(kt: Any) -> type:
    """A KerasTuner random search whose trials run the recipe (a class made here: KerasTuner is optional)."""

    class RecipeTuner(kt.RandomSearch):
        def __init__(
            self,
            *,
            prepared: PreparedData,
            base: TrainConfig,
            say: Callable[[str], None],
            fit_verbose: int,
            **kwargs: Any,
        ) -> None:
            self.prepared, self.base, self.say, self.fit_verbose = prepared, base, say, fit_verbose
            super().__init__(**kwargs)

        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            values = {name: trial.hyperparameters.get(name) for name in trial.hyperparameters.values}
            config = replace(self.base, **values)
            trial_dir = Path(self.get_trial_dir(trial.trial_id))
            self.say(f"trial {trial.trial_id}: {format_values(values)}")
            keras.backend.clear_session()  # the previous trial's graphs and layer names
            network = build_network(config, len(self.prepared.labels))
            # A trial interrupted earlier is handed out again by KerasTuner: go on from its last epoch.
            state = RunState.load(trial_dir, config, self.prepared.split.fingerprint)
            if state.phase != HEAD or state.epoch > 0:
                network.load_weights(trial_dir / CHECKPOINT_FILE)
            run_phases(network, config, state, trial_dir, self.prepared, say=self.say, verbose=self.fit_verbose)
            scores = predict_scores(network, self.prepared.validation)
            # The weights served their purpose (a ResNet50's are 100 MB per trial); the logs stay for TensorBoard.
            (trial_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
            self.say(f"trial {trial.trial_id}: {OBJECTIVE} {scores['accuracy']:.3f}, val_loss {scores['loss']:.3f}")
            return {
                OBJECTIVE: scores["accuracy"],
                "val_loss": scores["loss"],
                "val_top3_accuracy": scores["top3_accuracy"],
            }

    return RecipeTuner


def _check_identity(path: Path, config: TrainConfig, space: SearchSpace, fingerprint: str) -> None:
    """Refuse to continue a search in `path`'s folder that was started with another config, space or data.

    KerasTuner would silently keep its saved search space; the number of trials may change
    (to extend a search), nothing else.
    """
    identity = {
        "config": config.to_json(),
        "space": {name: list(values) for name, values in space.items()},
        "data_fingerprint": fingerprint,
    }
    if path.exists():
        if json.loads(path.read_text(encoding="utf-8")) != identity:
            raise ValueError(
                f"{path.parent} holds a search with another config, search space or data; "
                f"use another work dir or delete {path.parent} to start again"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1), encoding="utf-8")


def _trial_record(trial: Any) -> dict[str, Any]:
    metrics = {name: trial.metrics.get_last_value(name) for name in trial.metrics.metrics}
    record = {
        "trial_id": trial.trial_id,
        "status": str(trial.status),
        "hyperparameters": dict(trial.hyperparameters.values),
        "score": None if trial.score is None else float(trial.score),
        "metrics": {name: float(value) for name, value in metrics.items() if value is not None},
    }
    if getattr(trial, "message", None):
        record["message"] = trial.message
    return record


def _write_result(result: TuneResult, data: Path, space: SearchSpace) -> None:
    payload = {
        "objective": OBJECTIVE,
        "best": result.best,
        "score": result.score,
        "config": result.config.to_json(),
        "search_space": {name: list(values) for name, values in space.items()},
        "data": str(data),
        "data_fingerprint": result.data_fingerprint,
        "split": str(result.work_dir / SPLIT_FILE),
        "trials": result.trials,
    }
    tmp = result.path.with_name(result.path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    tmp.replace(result.path)
