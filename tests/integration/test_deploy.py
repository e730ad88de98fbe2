"""``deploy/``: the compose file's and the Kubernetes manifests' commands are real ``fedtre``
commands, run here outside containers (no container runtime on CI's machine), and the manifests
are valid against the Kubernetes schema.

The compose test runs the compose file itself: its setup script, then every service's command
in dependency order, each service's health check until it passes, and the researcher's query.
Only what a container gives differs: each volume is a folder, each service's address is a
loopback port (rewritten in copies of the config files).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.config import parse_coordinator_config
from fedtre.cli import build_parser
from node.config import parse_node_config

DEPLOY = Path(__file__).parents[2] / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
IMAGE_HOME = "/var/lib/fedtre"  # the image's WORKDIR, where each service's volume is mounted


def _fedtre() -> str:
    found = shutil.which("fedtre") or str(Path(sys.executable).parent / "fedtre")
    assert Path(found).exists(), "the fedtre command is not installed"
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _volume(service: dict[str, Any]) -> str | None:
    for mount in service.get("volumes", []):
        name, _, target = mount.partition(":")
        if target == IMAGE_HOME:
            return name
    return None


def test_the_compose_file_is_what_the_image_runs() -> None:
    compose = _compose()
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fedtre"]' in dockerfile and "USER 10001:10001" in dockerfile
    parser = build_parser()
    for name, service in compose["services"].items():
        assert service["image"] == "fedtre:latest"
        assert service["read_only"] and service["cap_drop"] == ["ALL"]
        if "command" in service:  # through the image's entrypoint: a fedtre command line
            args = parser.parse_args(service["command"])
            assert callable(args.func), name
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[:2] == ["CMD", "fedtre"]
            assert parser.parse_args(test[2:]).func.__name__ == "_health"
    # every trust has its own volume; none is mounted by another trust
    mounted = {n: _volume(s) for n, s in compose["services"].items() if n.startswith("trust-")}
    assert sorted(mounted.values()) == ["trust-a", "trust-b", "trust-c"]


@pytest.mark.slow
def test_the_compose_federation_runs_with_the_same_commands(tmp_path: Path) -> None:
    compose = _compose()
    services: dict[str, dict[str, Any]] = compose["services"]
    volumes = tmp_path / "volumes"
    config = tmp_path / "config"
    ports = {
        "trust-a:50051": _free_port(),
        "trust-b:50051": _free_port(),
        "coordinator:50050": _free_port(),
    }
    metrics = {name: _free_port() for name in services}
    # The config folder as each container sees it, with loopback ports instead of the
    # containers' network names and each volume's folder instead of /var/lib/fedtre.
    config.mkdir()
    shutil.copy(DEPLOY / "compose" / "config" / "setup.sh", config / "setup.sh")
    for name, service in services.items():
        source = DEPLOY / "compose" / "config" / f"{name}.toml"
        if not source.exists():
            continue
        text = source.read_text().replace(IMAGE_HOME, str(volumes / str(_volume(service))))
        for address, port in ports.items():
            text = text.replace(address, f"127.0.0.1:{port}")
            if address.startswith(f"{name}:"):  # the service's own listen address
                text = text.replace(f"0.0.0.0:{address.split(':')[1]}", f"127.0.0.1:{port}")
        text = re.sub(
            r'listen = "127\.0\.0\.1:946\d"', f'listen = "127.0.0.1:{metrics[name]}"', text
        )
        (config / f"{name}.toml").write_text(text)

    env = {**os.environ, "PATH": f"{Path(_fedtre()).parent}:{os.environ['PATH']}"}

    def command(argv: list[str]) -> list[str]:
        return [a.replace("/config/", f"{config}/") for a in argv]

    setup = services["setup"]
    assert setup["entrypoint"] == ["sh", "/config/setup.sh"]
    # As in the container: root with only the capabilities compose leaves it (cap_drop ALL,
    # cap_add), handing every volume to another user (the image's is 10001).
    owner = 12345
    setup_env = {**env, "OUT": str(volumes), "CONFIG": str(config), "OWNER": f"{owner}:{owner}"}
    assert setup["cap_drop"] == ["ALL"]
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in setup.get("cap_add", []))])
    as_container = ["setpriv", "--bounding-set", caps, "--inh-caps", "-all"]
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the setup as the container does")

    def run_setup() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_container, *command(setup["entrypoint"])],
            env=setup_env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = run_setup()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for volume in ("trust-a", "trust-b", "trust-c", "coordinator", "researcher"):
        root = volumes / volume
        assert root.stat().st_mode & 0o777 == 0o700
        assert {p.stat().st_uid for p in [root, *root.rglob("*")]} == {owner}
        keys = list((root / "pki").glob("*.key"))
        assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600  # its own key only
    # A second `docker compose up` runs the setup again, as the container does: it must see
    # that it is done (the volumes now belong to the image's user) and change nothing.
    again = run_setup()
    assert again.returncode == 0 and "already set up" in again.stdout, again.stderr
    # Outside containers the services below run as this test's user, not as 10001: give the
    # volumes to it (ownership is what the node's own checks look at).
    for path in [volumes, *volumes.rglob("*")]:
        os.chown(path, os.geteuid(), os.getegid())

    running: dict[str, subprocess.Popen[bytes]] = {}
    healthy: set[str] = set()
    try:
        for name in _start_order(services):
            service = services[name]
            if name == "setup":
                continue
            for dep, rule in service.get("depends_on", {}).items():  # compose's conditions
                if rule["condition"] == "service_healthy" and dep not in healthy:
                    check = command(services[dep]["healthcheck"]["test"][1:])
                    _wait_healthy(dep, check, env, tmp_path)
                    healthy.add(dep)
            argv = [_fedtre(), *command(service["command"])]
            if name == "researcher":
                answer = subprocess.run(
                    argv, env=env, cwd=volumes / "researcher", capture_output=True, text=True,
                    timeout=120,
                )  # fmt: skip
                assert answer.returncode == 0, answer.stderr
                assert "age_band" in answer.stdout, answer.stdout
                continue
            log = (tmp_path / f"{name}.log").open("wb")
            running[name] = subprocess.Popen(
                argv, env=env, cwd=volumes / str(_volume(service)), stdout=log, stderr=log
            )
        assert healthy == {"trust-a", "trust-b", "coordinator", "trust-c"}
    finally:
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        codes = {name: proc.wait(timeout=30) for name, proc in running.items()}
    assert codes == dict.fromkeys(running, 0)


def _start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    """Services after what they depend on (compose's own ``depends_on``)."""
    order: list[str] = []
    while len(order) < len(services):
        for name, service in services.items():
            needs = set(service.get("depends_on", {}))
            if name not in order and needs <= set(order):
                order.append(name)
                break
        else:
            raise AssertionError("depends_on has a cycle")
    return order


def _wait_healthy(name: str, check: list[str], env: dict[str, str], logs: Path) -> None:
    check = [_fedtre(), *check[1:]]
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never healthy: {done.stdout} {done.stderr}\n"
                                 + (logs / f"{name}.log").read_text()[-3000:])  # fmt: skip
        time.sleep(0.5)


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())]


def test_the_kubernetes_manifests_are_valid_and_complete() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    docs = _documents()
    for _path, doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    # the validator is not a formality: a misspelt field is refused
    broken = copy.deepcopy(next(d for _, d in docs if d["kind"] == "Deployment"))
    broken["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)
    kinds = {(path.stem, doc["kind"]) for path, doc in docs}
    for stem in ("node", "coordinator"):
        for kind in ("ConfigMap", "PersistentVolumeClaim", "Deployment", "NetworkPolicy"):
            assert (stem, kind) in kinds


def test_the_manifests_run_fedtre_commands_on_configs_fedtre_accepts(tmp_path: Path) -> None:
    parser = build_parser()
    for _path, doc in _documents():
        if doc["kind"] == "ConfigMap":
            for key, text in doc["data"].items():
                data = tomllib.loads(text)  # unknown keys are refused by the parsers below
                if key == "node.toml":
                    parsed = parse_node_config(data, tmp_path, key)
                    assert parsed.metrics_listen and parsed.server is not None
                else:
                    assert parse_coordinator_config(data, tmp_path, key).metrics_listen
            continue
        spec = doc["spec"]
        pod = (
            spec["jobTemplate"]["spec"]["template"]["spec"]
            if doc["kind"] == "CronJob"
            else spec.get("template", {}).get("spec")
        )
        if pod is None:
            continue
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert container["securityContext"]["readOnlyRootFilesystem"]
            if "args" in container:  # through the image's entrypoint
                assert callable(parser.parse_args(container["args"]).func)
        for container in pod["containers"]:
            if doc["kind"] != "Deployment":
                continue
            ready = container["readinessProbe"]
            if container["name"] == "node":  # ready while its own checks hold
                assert ready["httpGet"]["path"] == "/healthz"
            else:  # the coordinator stays reachable while it waits for a dial-out trust
                assert "tcpSocket" in ready
        secrets = [v for v in pod["volumes"] if "secret" in v]
        if doc["kind"] == "Deployment":
            assert secrets and all(v["secret"]["defaultMode"] == 0o400 for v in secrets)
