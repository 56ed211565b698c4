"""The image and the compose stack, driven for the container tests (tests/test_container_stack.py).

The stack is docker-compose.yml as shipped, with one change made here: every service runs on the host
network, so that all traffic stays on loopback (the api on 127.0.0.1:8000, PostgreSQL on 127.0.0.1:5432)
and each service name resolves to 127.0.0.1. Compose v2 (`docker compose`) is used where it is
installed, else compose v1 (`docker-compose`), which also needs the top-level `name` dropped.
"""

import copy
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT
from tests.support.desks import Desk

IMAGE = "headoni:latest"
PROJECT = "headoni-test-stack"
API_PORT = 8000
SECOND_API_PORT = 8010
POSTGRES_PORT = 5432
DATABASE_URL = f"postgresql://headoni:headoni@127.0.0.1:{POSTGRES_PORT}/headoni"
# What compose interpolates into the file, fixed here so that a user's .env cannot change the stack.
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "headoni",
    "HEADONI_WORKERS": "2",
    "HEADONI_PORT": str(API_PORT),
    "HEADONI_BASE_DOMAIN": "localhost",
}


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def engine_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers."""
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    if info.returncode != 0:
        return "`docker info` failed: " + (info.stderr.strip().splitlines() or ["no output"])[-1]
    return None


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def build_image() -> None:
    """`docker build --network host .`: the build stage installs the project's dependencies with pip."""
    docker("build", "--network", "host", "-t", IMAGE, str(ROOT), timeout=600)


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", image).stdout)


def base_image() -> str:
    """The image the Dockerfile's final stage starts from."""
    froms = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")]
    return froms[-1]


def on_one_host(spec: dict[str, Any]) -> dict[str, Any]:
    """The compose file with every service on the host network, as described at the top."""
    spec = copy.deepcopy(spec)
    spec.pop("name", None)
    names = list(spec["services"])
    for service in spec["services"].values():
        service["network_mode"] = "host"
        service.pop("ports", None)
        service.pop("networks", None)
        service["extra_hosts"] = [f"{name}:127.0.0.1" for name in names]
    return spec


def with_second_api(spec: dict[str, Any], port: int) -> dict[str, Any]:
    """Another api service like the first, on the same database, listening on `port` (on the host
    network two containers cannot share a port); its health check asks that port."""
    spec = copy.deepcopy(spec)
    api = copy.deepcopy(spec["services"]["api"])
    command = [str(part) for part in api["command"]]
    command[command.index("--port") + 1] = str(port)
    api["command"] = command
    test = image_healthcheck()
    api["healthcheck"] = {"test": [*test[:-1], test[-1].replace(f":{API_PORT}/", f":{port}/")], "interval": "10s"}
    spec["services"]["api-2"] = api
    return spec


def image_healthcheck() -> list[str]:
    """The built image's HEALTHCHECK command, in compose's ["CMD", ...] form."""
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config.Healthcheck}}", IMAGE).stdout)
    test: list[str] = config["Test"]
    return test


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Stack:
    """The compose project, run from files written to `directory`, with the repository as project directory."""

    command: list[str]
    directory: Path

    def write(self, spec: dict[str, Any], name: str) -> Path:
        path = self.directory / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def compose(
        self, *args: str, file: str = "compose.yml", timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.command, "-p", PROJECT, "--project-directory", str(ROOT), "-f", str(self.directory / file)]
        env = {**os.environ, **COMPOSE_ENV}
        result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} exited {result.returncode}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
            )
        return result

    def containers(self, service: str, *, one_off: bool = False) -> list[str]:
        """Ids of the service's containers, running or not (`compose run` ones only with one_off)."""
        labels = [f"com.docker.compose.project={PROJECT}", f"com.docker.compose.service={service}"]
        filters = [arg for label in labels for arg in ("--filter", f"label={label}")]
        ids = docker("ps", "-a", "-q", "--no-trunc", *filters).stdout.split()
        return [i for i in ids if (self.label(i, "com.docker.compose.oneoff") == "True") == one_off]

    def container(self, service: str) -> str:
        [found] = self.containers(service)
        return found

    @staticmethod
    def label(container: str, name: str) -> str:
        return docker("inspect", "-f", f'{{{{index .Config.Labels "{name}"}}}}', container).stdout.strip()

    @staticmethod
    def inspect(container: str) -> dict[str, Any]:
        [details] = json.loads(docker("inspect", container).stdout)
        found: dict[str, Any] = details
        return found

    def wait_healthy(self, *services: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            for service in list(pending):
                state = self.inspect(self.container(service))["State"]
                if state.get("Health", {}).get("Status") == "healthy":
                    pending.remove(service)
                elif state["Status"] != "running":
                    logs = self.compose("logs", "--no-color", service, check=False).stdout[-3000:]
                    raise AssertionError(f"{service} is {state['Status']} (exit {state['ExitCode']}):\n{logs}")
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"not healthy within {timeout:g} s: {pending}")
            if pending:
                time.sleep(0.5)

    def up(self) -> None:
        """`compose up -d` (the image is built already), then wait for every health check."""
        self.compose("up", "-d", "--no-build")
        self.wait_healthy("postgres", "api")

    def headoni(self, *args: str) -> str:
        """`compose run --rm migrate <args>`: a headoni command in a one-off container; its stdout."""
        return self.compose("run", "--rm", "-T", "migrate", *args).stdout

    def make_desk(self, subdomain: str, name: str) -> tuple[dict[str, Any], Desk]:
        """A desk and a token with both scopes, made with `compose run`; (the desk as printed, the Desk)."""
        desk = json.loads(self.headoni("desk", "create", subdomain, "--name", name, "--json").splitlines()[-1])
        token = json.loads(
            self.headoni(
                "token", "create", "--desk", subdomain, "--name", "Container test",
                "--scope", "tickets:create", "--scope", "tickets:read", "--json",
            ).splitlines()[-1]
        )
        made = Desk(
            subdomain, int(desk["id"]), desk["defaultDepartmentId"], desk["defaultTicketTypeId"],
            token["id"], token["secret"],
        )
        return desk, made

    def down(self, *args: str, file: str = "compose.yml") -> None:
        self.compose("down", "--remove-orphans", *args, file=file)
