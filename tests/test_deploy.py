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


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
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
