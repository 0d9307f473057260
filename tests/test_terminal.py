"""`carbot shell` with piped standard input: a script holds a whole conversation on the embedded defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import TEST_LABELS, jpeg_bytes


def test_piped_conversation_photo_vote_correction_and_admin_commands(model_registry, tmp_path):
    photo = tmp_path / "car.jpg"
    photo.write_bytes(jpeg_bytes(1))
    (tmp_path / "notes.jpg").write_text("not a photo")
    script = "\n".join([
        str(photo),                     # classified through the queue
        "+",                            # 👍 on that answer
        "+",                            # repeated: harmless
        "-",                            # changed to 👎: the other candidates are offered
        "1",                            # pick the first candidate as the correction
        str(tmp_path / "notes.jpg"),    # not a picture
        str(tmp_path / "missing.jpg"),  # no such file
        f"/top3 {photo}",               # a command with a path argument
        f"/top3 {tmp_path / 'gone.jpg'}",
        "hello",                        # plain text: a hint
        "/stats",                       # the local user is an admin
        "/quit",
    ]) + "\n"  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(CARBOT_MODEL_REGISTRY=str(model_registry), CARBOT_DATA_DIR=str(tmp_path / "data"), LANG="en_US.UTF-8")
    run = subprocess.run([sys.executable, "-m", "carbot", "shell"], input=script, env=env,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, run.stderr
    assert sum(label in out for label in TEST_LABELS) >= 3
    assert "[1] 👍   [2] 👎" in out
    assert "· 👍 Thanks!" in out and "· Already recorded, thanks." in out
    assert "· 👎 Thanks! Which model was it?" in out
    assert "✅ Thanks! Recorded as" in out
    assert "I can't use this picture" in out
    assert f"No such file: {tmp_path / 'missing.jpg'}" in out
    assert f"No such file: {tmp_path / 'gone.jpg'}" in out and "No such file: /top3" not in out
    assert out.count("[1] 👍   [2] 👎") == 2  # the photo, then /top3 of it
    assert "Send me a photo of a car" in out
    assert "2 answers to 1 people · 👍 0 · 👎 1 · 1 corrections" in out

    stats = subprocess.run([sys.executable, "-m", "carbot", "stats", "--json"], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    numbers = json.loads(stats.stdout)
    assert (numbers["predictions"], numbers["down"], numbers["corrections"]) == (2, 1, 1)


def test_quitting_at_once_stops_quietly(model_registry, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(CARBOT_MODEL_REGISTRY=str(model_registry), CARBOT_DATA_DIR=str(tmp_path / "data"), LANG="en_US.UTF-8")
    run = subprocess.run([sys.executable, "-m", "carbot", "shell"], input="/help\n/quit\n", env=env,
                         capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Send me a photo of a car" in run.stdout
    # The retrain-event listener stops before Redis does: no closed connection reported as an outage.
    assert "WARNING" not in run.stderr and "ERROR" not in run.stderr, run.stderr
