"""A deployed federation on loopback, as deploy/flower/README.md starts one: a SuperLink with TLS and
SuperNode authentication, three SuperNodes each reading only its own hospital folder, the study
submitted with `flwr run` for two rounds; one SuperNode killed during round 1. Real processes, stopped by PID."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, hospitals

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("hospital_a", "hospital_b", "hospital_c")


class Federation:
    """The processes of a loopback federation; ``stop`` kills every one by PID."""

    def __init__(self, tmp_path: Path, certs: Path | None = None):
        self.dir = tmp_path
        self.env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # (flower-superexec, ...)
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        (tmp_path / "flwr-home").mkdir()
        if certs:  # the coordinator's flwr CLI: where the SuperLink is
            (tmp_path / "flwr-home/config.toml").write_text(
                f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\naddress = "127.0.0.1:{self.port}"\n'
                f'root-certificates = "{certs / "ca.crt"}"\n')

    def superlink(self, certs: Path, simulation: bool = False) -> None:
        """The coordinator's SuperLink on loopback: TLS, installed packages, and SuperNode
        authentication (``simulation``: Flower's Simulation Runtime instead of SuperNodes)."""
        self.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                                 "--ssl-certfile", str(certs / "superlink.pem"), "--ssl-keyfile",
                                 str(certs / "superlink.key"), "--simulation" if simulation else "--enable-supernode-auth",
                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                 "--port", str(self.port), "--database", str(self.dir / "superlink.db")])
        _wait_for(lambda: "Uvicorn running on https://" in self.log("superlink"), 60, "the SuperLink")

    def register(self, certs: Path, key: str) -> None:
        registered = self.flwr("supernode", "register", str(certs / f"{key}.pub"))
        assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered

    def supernode(self, certs: Path, key: str, site: str, root: Path, port: int, folder: str | None = None) -> None:
        """SuperNode ``key`` (its private key's name) as site ``site`` reading root/``folder``
        (default: root/site), connecting to the Fleet API at 127.0.0.1:``port``."""
        self.start(key, [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                         "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key",
                         str(certs / key), "--port", str(free_port()), "--node-config",
                         f'site-name="{site}" data-root="{root / (folder or site)}" '
                         f'state-dir="{self.dir / "site-state" / key}"'])

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Start ``argv``; its output goes to NAME.log, each line stamped with the time it came."""
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir,
                                start_new_session=True, text=True, errors="replace")
        log = (self.dir / f"{name}.log").open("w", buffering=1)
        threading.Thread(target=lambda: [log.write(f"{time.strftime('%H:%M:%S')} {line}") for line in proc.stdout],
                         daemon=True).start()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.dir, capture_output=True, text=True,
                              timeout=timeout)

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and every process it started (Flower detaches its app processes
        into sessions of their own, so a process group is not enough)."""
        import psutil

        proc = self.procs[name]
        if proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()

    def stop(self) -> None:
        for name in self.procs:
            self.kill(name)

    def diagnosis(self, run_id: int | None) -> str:
        """The end of every process's log and of the ServerApp's (what a failed wait shows)."""
        parts = [f"== {name}.log\n" + "\n".join(self.log(name).splitlines()[-25:]) for name in self.procs]
        if run_id is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                parts.append("== flwr log\n" + self.flwr("log", str(run_id), "--show", timeout=30).stdout[-6000:])
        return "\n".join(parts)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow  # 5 min on 2 cores: out of CI's 30 minutes; `make test-all`
def test_a_deployed_federation_with_tls_and_authenticated_supernodes(mlflow_uri, mednist_root, tmp_path):
    root = hospitals(mednist_root, tmp_path)
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy/flower/make_certs.sh"), str(certs), "127.0.0.1,localhost",
                    *SITES, "intruder", "impostor"], check=True, capture_output=True)
    fed = Federation(tmp_path, certs)
    out, uri, run_id = tmp_path / "study", mlflow_uri, None
    try:
        fed.superlink(certs)
        for site in SITES:
            fed.register(certs, site)
        for site in (*SITES, "intruder"):  # the intruder's key was never registered
            fed.supernode(certs, site, site, root, fed.port, folder=None if site != "intruder" else "hospital_a")
        # a 0.6 M-parameter timm model: MedMamba-T's 56 MB weights take ~35 s per message on 2 busy cores,
        # and what is tested here is the deployment, not the model (the simulations train MedMamba)
        overrides = (f"model.name=mobilenetv3_small_050 data.size=28 federated.rounds=2 federated.round_timeout=120 "
                     f"train.batch_size=32 mlflow.tracking_uri={uri}")
        submitted = fed.flwr("run", str(ROOT), "hospitals", "--format", "json", "--run-config",
                             f'set="{overrides}" output-dir="{out}"')
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]

        # hospital_c's SuperNode dies as it starts training in round 1: the study's 2 rounds finish with the others
        _wait_for(lambda: "Receiving: train message" in fed.log("hospital_c"), 180, "round 1 at hospital_c")
        fed.kill("hospital_c")
        def status() -> str:
            return json.loads(fed.flwr("ls", "--run-id", str(run_id), "--format", "json").stdout)["runs"][0]["status"]

        _wait_for(lambda: (out / "federated_rounds.csv").is_file(), 300, "the report")  # (written last)
        _wait_for(lambda: status().startswith("finished"), 60, "the run's status")
        assert status() == "finished:completed"

        # a registered SuperNode that claims a live site's name: the next study refuses to start
        fed.register(certs, "impostor")
        fed.supernode(certs, "impostor", "hospital_a", root, fed.port, folder="hospital_b")
        again = fed.flwr("run", str(ROOT), "hospitals", "--format", "json", "--run-config",
                         f'set="{overrides} federated.rounds=1" output-dir="{tmp_path / "again"}"')
        run_id = json.loads(again.stdout)["run-id"]
        _wait_for(lambda: status().startswith("finished"), 180, "the second run's status")
        assert status() == "finished:failed"
        assert ("two nodes say they are site hospital_a: give each SuperNode its own site-name"
                in fed.flwr("log", str(run_id), "--show", timeout=30).stdout)
    except AssertionError as exc:  # (within pytest's timeout, so that the logs are seen)
        raise AssertionError(f"{exc}\n{fed.diagnosis(run_id)}") from None
    finally:
        fed.stop()

    report = json.loads((out / "federated_report.json").read_text())
    assert report["sites"] == list(SITES) and report["global_test"].startswith("the sites' test splits")
    first, second = report["rounds"]  # a dead SuperNode is not sampled again
    assert set(first["sites"]) == set(second["sites"]) == {"hospital_a", "hospital_b"} and not second["failures"]
    assert first["failures"] == ["site hospital_c failed: Error: Node Unavailable — The destination node failed to "
                                "report a heartbeat within 2 × its expected interval."]
    # counts only left the sites: hospital_c has no HeadCT, the others 20 images per class in all
    stats = report["site_statistics"]
    assert sum(v for k, v in stats["hospital_a"].items() if k.endswith("/HeadCT")) == 20
    assert sum(v for k, v in stats["hospital_c"].items() if k.endswith("/HeadCT")) == 0
    assert len(report["class_names"]) == 6 and 0 <= report["best"]["test"]["accuracy"] <= 1
    assert "intruder" not in json.dumps(report)
    assert "intruder" not in stats and "No SuperNode found with the given public key" in fed.log("superlink")

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("medmamba-federated").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]  # the study, and the refused one
    (run,) = [r for r in runs if r.info.status == "FINISHED"]
    assert run.data.tags["sites"] == ",".join(SITES)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "global/accuracy")] == [1, 2]
    assert run.data.params["federated.partition"] == "deployed"


@pytest.mark.slow  # 1-2 min on 2 cores; `make test-all`
def test_flwr_run_on_the_simulation_runtime(medmnist_root, tmp_path):
    """`flwr run . sim` against a SuperLink in simulation mode (deploy/flower/README.md): the same
    apps, configured by the run config, on Flower's Simulation Runtime."""
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy/flower/make_certs.sh"), str(certs), "127.0.0.1,localhost"],
                   check=True, capture_output=True)
    fed = Federation(tmp_path, certs)
    out = tmp_path / "study"
    try:
        fed.superlink(certs, simulation=True)  # TLS here too
        configured = fed.flwr("federation", "simulation-config", "@none/default", "hospitals", "--num-supernodes", "3",
                              "--client-resources-num-cpus", "1")
        assert configured.returncode == 0, configured.stdout + configured.stderr
        overrides = (f"federated.rounds=1 data.root={medmnist_root} mlflow.enabled=false "
                     "federated.centralized_baseline=false")
        done = fed.flwr("run", str(ROOT), "hospitals", "--stream", "--run-config",
                        f'recipe="configs/federated_quick.yaml" set="{overrides}" output-dir="{out}"', timeout=400)
        assert done.returncode == 0 and (out / "federated_report.json").is_file(), (
            done.stdout[-3000:] + done.stderr[-3000:] + fed.diagnosis(None))
    finally:
        fed.stop()
    report = json.loads((out / "federated_report.json").read_text())
    assert report["sites"] == ["site_0", "site_1", "site_2"] and len(report["rounds"]) == 1
    assert set(report["rounds"][0]["sites"]) == set(report["sites"]) and not report["rounds"][0]["failures"]
    assert 0.5 < report["rounds"][0]["global"]["auc"] <= 1


@pytest.mark.slow  # 2-3 min on 2 cores; `make test-all`
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (e.g. apt-get install nginx-light)")
def test_hospitals_reach_only_the_fleet_api_through_the_nginx_recipe(mednist_root, tmp_path):
    """deploy/flower/nginx-fleet.conf in front of the loopback SuperLink: two SuperNodes train a round
    through it, and every other API (the Control API, which runs studies) is refused there."""
    root = hospitals(mednist_root, tmp_path)
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "deploy/flower/make_certs.sh"), str(certs), "127.0.0.1,localhost",
                    "hospital_a", "hospital_b"], check=True, capture_output=True)
    fed, proxy = Federation(tmp_path, certs), free_port()
    fleet = ((ROOT / "deploy/flower/nginx-fleet.conf").read_text().replace("/etc/medmamba/certs", str(certs))
             .replace("9092", str(proxy)).replace("127.0.0.1:9093", f"127.0.0.1:{fed.port}")
             .replace("fl.coordinator.example.org", "localhost"))
    (tmp_path / "fleet.conf").write_text(fleet)
    # the recipe included in a minimal nginx.conf; as root, its workers too (the default "nobody"
    # cannot write request bodies into this test's private folder)
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "") + f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/nginx-error.log;\nevents {{}}\nhttp {{\n"
        f"  access_log {tmp_path}/nginx-access.log;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  include {tmp_path}/fleet.conf;\n}}\n")
    out, run_id = tmp_path / "study", None
    try:
        fed.superlink(certs)
        fed.start("nginx", ["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"])
        _wait_for(lambda: (tmp_path / "nginx.pid").is_file(), 30, "nginx")
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        for path in ("/v1/control/list-runs", "/health", "/"):  # anything but the Fleet API: 403
            with pytest.raises(urllib.error.HTTPError, match="403"):
                urllib.request.urlopen(f"https://127.0.0.1:{proxy}{path}", context=context, timeout=10)
        for site in ("hospital_a", "hospital_b"):
            fed.register(certs, site)
            fed.supernode(certs, site, site, root, proxy)
        overrides = ("model.name=mobilenetv3_small_050 data.size=28 federated.rounds=1 federated.num_sites=2 "
                     "federated.round_timeout=120 train.batch_size=32 mlflow.enabled=false")
        submitted = fed.flwr("run", str(ROOT), "hospitals", "--format", "json", "--run-config",
                             f'set="{overrides}" output-dir="{out}"')
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = json.loads(submitted.stdout)["run-id"]
        _wait_for(lambda: (out / "federated_rounds.csv").is_file(), 300, "the report")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{fed.diagnosis(run_id)}") from None
    finally:
        fed.stop()
    report = json.loads((out / "federated_report.json").read_text())
    assert set(report["rounds"][0]["sites"]) == {"hospital_a", "hospital_b"} and not report["rounds"][0]["failures"]
    assert "/v1/fleet/" in (tmp_path / "nginx-access.log").read_text()  # the SuperNodes came through the proxy
