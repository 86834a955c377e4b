"""deploy/: what can be checked without a cluster: manifests parse, name real entry points and
configs, and the Dockerfile installs with the README's commands."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from medmamba.cli import build_parser
from medmamba.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _check_command(command: str) -> None:
    """A `medmamba ...` command line parses with our CLI and names configs that load."""
    argv = shlex.split(command)
    assert argv[0] == "medmamba", command
    args = build_parser().parse_args(argv[1:])
    config = Path(args.config)
    config = config if config.is_absolute() else ROOT / config
    config = ROOT / "configs" / config.name if str(config).startswith("/opt/medmamba/") else config
    load_config(config, args.set)


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/networkpolicy.yaml",
                                  "mlflow/docker-compose.yml"])
def test_manifests_parse(name):
    assert isinstance(_yaml(name), dict)


def test_kuberay_manifests_use_the_pinned_ray_and_the_image():
    cluster, job = _yaml("kuberay/raycluster.yaml"), _yaml("kuberay/rayjob.yaml")
    from importlib.metadata import version

    for kind, manifest, spec in (("RayCluster", cluster, cluster["spec"]), ("RayJob", job, job["spec"]["rayClusterSpec"])):
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
        assert spec["rayVersion"] == version("ray")
        images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
        images |= {c["image"] for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
        assert images == {_yaml("ray-cluster.yaml")["docker"]["image"]}
    _check_command(job["spec"]["entrypoint"])


def test_readme_submit_commands_parse_with_the_cli():
    text = (DEPLOY / "README.md").read_text()
    commands = re.findall(r"-- \\\n\s+(medmamba .*?)(?:\n\n|\n```)", text, flags=re.S)
    assert len(commands) == 2
    for command in commands:
        _check_command(command.replace("\\\n", " "))


def test_the_dockerfile_installs_with_the_readme_commands():
    readme = (DEPLOY / "README.md").read_text()
    block = re.search(r"## 1\. Install on a GPU machine.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    install = [line.strip() for line in block.splitlines() if line.strip()]
    docker = (DEPLOY / "Dockerfile").read_text()
    run_lines = [cmd.strip() for line in re.findall(r"^RUN (.*)$", docker, flags=re.M) for cmd in line.split("&&")]
    for command in install:
        assert command in run_lines, f"the Dockerfile does not run {command!r}"
    for source in re.findall(r"^COPY (\S+) ", docker, flags=re.M):
        for part in source.split():
            assert (ROOT / part).exists(), part


def test_the_mlflow_recipe_uses_postgres_and_an_artifact_store():
    compose = _yaml("mlflow/docker-compose.yml")["services"]
    command = compose["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in command and "--artifacts-destination s3://" in command
    assert {"postgres", "minio", "mlflow"} <= set(compose)


# --- secure by default ----------------------------------------------------------------------------

def test_no_recipe_exposes_an_unauthenticated_server():
    launcher = _yaml("ray-cluster.yaml")
    for command in launcher["head_start_ray_commands"][1:] + launcher["worker_start_ray_commands"][1:]:
        assert command.startswith("RAY_AUTH_MODE=token ray start"), command
    assert "--dashboard-host=127.0.0.1" in launcher["head_start_ray_commands"][1]
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        text = (DEPLOY / name).read_text()
        containers = re.findall(r"- name: ray-(?:head|worker)\n", text)
        assert len(containers) == text.count("{name: RAY_AUTH_MODE, value: token}") == text.count(
            "secretKeyRef: {name: medmamba-ray-token") == 2, name
        assert "http://" not in text and "LoadBalancer" not in text and "NodePort" not in text
    compose = _yaml("mlflow/docker-compose.yml")["services"]
    published = {name: service.get("ports", []) for name, service in compose.items()}
    assert published.pop("caddy") == ["443:443"]  # TLS, in front of MLflow
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports), published
    assert "--app-name basic-auth" in compose["mlflow"]["command"]
    flower = "".join(re.findall(r"```bash\n(.*?)```", (DEPLOY / "flower/README.md").read_text(), flags=re.S))
    assert "--insecure" not in flower and "--enable-supernode-auth" in flower and "--host 127.0.0.1" in flower
    nginx = (DEPLOY / "flower/nginx-fleet.conf").read_text()
    assert re.findall(r"location (\S+)", nginx) == ["/v1/fleet/", "/"] and "return 403;" in nginx


@pytest.mark.integration
def test_a_ray_head_with_token_authentication_refuses_a_job_without_the_token(tmp_path):
    """What the recipes start: the job server refuses `ray job submit` unless it carries the token."""
    import os
    import subprocess
    import sys
    import time

    from conftest import free_port, ray_head

    ray = str(Path(sys.executable).parent / "ray")
    owner, stranger = tmp_path / "owner", tmp_path / "stranger"
    owner.mkdir(), stranger.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    as_owner = {**env, "HOME": str(owner), "RAY_AUTH_MODE": "token"}  # (the client reads ~/.ray/auth_token)
    subprocess.run([ray, "get-auth-token", "--generate"], env=as_owner, check=True, capture_output=True)
    dashboard = free_port()
    with ray_head(["--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                   "--num-cpus", "1", "--include-dashboard", "true"], as_owner) as head:
        submit = [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--", "echo", "ran"]
        deadline = time.time() + 120
        while (accepted := subprocess.run(submit, env=as_owner, capture_output=True, text=True, timeout=120)).returncode:
            assert time.time() < deadline and head.poll() is None, accepted.stdout[-2000:] + accepted.stderr[-2000:]
            time.sleep(2)  # (the job server is still starting)
        assert "ran" in accepted.stdout
        refused = subprocess.run(submit, env={**env, "HOME": str(stranger)}, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "no authentication token was found" in refused.stdout + refused.stderr
