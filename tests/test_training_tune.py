"""`carbot tune`: a KerasTuner search whose trials are the training recipe, its result saved, the best trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from carbot import cli
from carbot.settings import get_settings
from model import ModelRegistry, read_artefact
from training import TrainConfig, load_split, make_synthetic_dataset

SPACE = {"learning_rate": (0.01, 0.03), "dropout": (0.0, 0.3), "finetune_fraction": (0.5, 1.0)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("tune-data"), per_class=12, size=(48, 36), seed=5)


def tiny_config() -> TrainConfig:
    return TrainConfig(backbone="tiny", image_size=32, weights=None, batch_size=16, head_epochs=1, finetune_epochs=1)


@pytest.mark.slow
def test_a_tiny_search_records_its_trials_and_names_values_from_the_space(dataset: Path, tmp_path: Path) -> None:
    from training._tune import RESULT_FILE, SearchSpace, tune

    space = SearchSpace(**SPACE)
    work_dir = tmp_path / "search"
    result = tune(dataset, work_dir, tiny_config(), space, max_trials=2, progress=False)

    assert set(result.best) == set(SPACE)
    for name, value in result.best.items():
        assert value in SPACE[name], (name, value)
    assert result.config.learning_rate == result.best["learning_rate"]
    assert result.config.backbone == "tiny" and result.config.head_epochs == 1  # the rest is the base config

    # Both trials ran the recipe and were scored on the validation split; the best is the highest.
    assert len(result.trials) == 2
    assert len({json.dumps(trial["hyperparameters"], sort_keys=True) for trial in result.trials}) == 2
    for trial in result.trials:
        assert trial["status"] == "COMPLETED"
        assert 0.0 <= trial["score"] <= 1.0
        assert trial["metrics"]["val_accuracy"] == trial["score"]
        assert "val_loss" in trial["metrics"]
    assert result.score == max(trial["score"] for trial in result.trials)

    # Saved as JSON, next to the split it was searched on (the split the final training reuses).
    saved = json.loads((work_dir / RESULT_FILE).read_text())
    assert saved["best"] == result.best and saved["score"] == result.score
    assert [trial["score"] for trial in saved["trials"]] == [trial["score"] for trial in result.trials]
    assert saved["data_fingerprint"] == load_split(work_dir / "split.csv").fingerprint == result.data_fingerprint
    assert saved["search_space"] == {name: list(values) for name, values in SPACE.items()}

    # The same work dir continues the same search (no trial is run twice) and refuses another space.
    again = tune(dataset, work_dir, tiny_config(), space, max_trials=2, progress=False)
    assert again.best == result.best and len(again.trials) == 2
    with pytest.raises(ValueError, match="another config, search space or data"):
        tune(dataset, work_dir, tiny_config(), SearchSpace(learning_rate=(0.1,)), max_trials=1, progress=False)


@pytest.fixture(scope="module")
def learnable_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # --train-best --activate needs a model that learned something: one at chance is refused (issue 17).
    return make_synthetic_dataset(tmp_path_factory.mktemp("tune-learnable"), per_class=50, size=(48, 36), seed=6)


@pytest.mark.slow
def test_carbot_tune_prints_saves_and_trains_the_best(
    learnable_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = learnable_dataset
    registry_root = tmp_path / "models"
    monkeypatch.setenv("CARBOT_MODEL_REGISTRY", str(registry_root))
    monkeypatch.setenv("CARBOT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            cli.main,
            ["tune", str(dataset), "--backbone", "tiny", "--weights", "none", "--image-size", "32",
             "--batch-size", "16", "--head-epochs", "8", "--finetune-epochs", "1", "--trials", "1",
             "--learning-rates", "0.02", "--dropouts", "0.1,0.2", "--finetune-fractions", "1",
             "--work-dir", str(tmp_path / "work"), "--train-best", "--version", "tuned", "--activate",
             "--no-variants"],
        )  # fmt: skip
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "work" / "best_hyperparameters.json").read_text())
    assert saved["best"]["learning_rate"] == 0.02 and saved["best"]["dropout"] in (0.1, 0.2)
    assert "learning_rate=0.02" in result.output and "best_hyperparameters.json" in result.output

    # --train-best: a model version trained by train() with the best values, on the search's split.
    assert ModelRegistry(registry_root).active_version() == "tuned"
    artefact = read_artefact(registry_root / "tuned")
    config = artefact.meta["extra"]["config"]
    assert (config["learning_rate"], config["dropout"]) == (0.02, saved["best"]["dropout"])
    assert artefact.meta["data_fingerprint"] == saved["data_fingerprint"]
    assert artefact.meta["extra"]["tuned"]["best"] == saved["best"]
    assert (artefact.path / "report.md").is_file()


def test_without_keras_tuner_carbot_tune_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "keras_tuner", None)  # what an install without the extra gives
    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(cli.main, ["tune", str(tmp_path / "photos"), "--work-dir", str(tmp_path / "w")])
    assert result.exit_code != 0
    assert "pip install 'carbot[tune]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "w").exists()  # nothing was started
