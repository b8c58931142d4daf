"""Ray clusters as users run them: the local runtime's authentication, and a real token-authenticated
two-node cluster on this machine (a head and a second node, each `ray start` with its own CPUs, ports and
temp dir) that runs a tiny pretraining job submitted with `scripts/submit.sh` (`ray job submit`), and a
federated simulation submitted with `scripts/federate.sh`."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import CONFIG
from test_federated import make_npz
from curvtrain.distributed import checkpoint
from curvtrain.distributed.metrics import read_metrics
from curvtrain.launcher.cluster import local_auth_env

ROOT = Path(__file__).parents[1]
SUBMIT = ROOT / "scripts" / "submit.sh"
FEDERATE = ROOT / "scripts" / "federate.sh"
BIN = Path(sys.executable).parent  # the venv's `ray` and `curvtrain`, as an activated venv puts them on PATH


def test_local_runtime_gets_a_fresh_token_unless_the_user_chose():
    first, second = local_auth_env({}), local_auth_env({"HOME": "/h"})
    assert set(first) == {"RAY_AUTH_TOKEN"} and re.fullmatch(r"[0-9a-f]{64}", first["RAY_AUTH_TOKEN"])
    assert first != second  # random per runtime, not a fixed secret
    assert local_auth_env({"RAY_AUTH_MODE": "disabled"}) == {}
    assert local_auth_env({"RAY_AUTH_MODE": "token"}) == {}  # the user's own token file or variable is used
    assert local_auth_env({"RAY_AUTH_TOKEN": "mine"}) == {}


def test_cluster_yaml_passes_rays_schema_and_uses_token_auth():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((ROOT / "scripts" / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    starts = config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "0.0.0.0" not in " ".join(starts)  # the job API stays on the head's loopback
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_submit_refuses_without_a_token(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run([SUBMIT, "127.0.0.1", CONFIG, "/shared/run"], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "no Ray token" in result.stderr
    result = subprocess.run([SUBMIT, "127.0.0.1", CONFIG, "runs/x"], env=env | {"RAY_AUTH_TOKEN": "t"}, capture_output=True, text=True)
    assert result.returncode == 2 and "RUN_DIR must be an absolute path" in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TwoNodeCluster:
    """A head and a second node on this machine, each `ray start --block` in a session of its own (own temp
    dir, ports and CPUs), with token authentication. `stop` ends exactly the processes these two started."""

    def __init__(self, root: Path, cpus_per_node: int):
        self.root = root
        self.token = root / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        gcs, self.dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{gcs}"
        node = [f"--num-cpus={cpus_per_node}", f"--dashboard-agent-listen-port={free_port()}",
                "--object-store-memory=100000000", "--disable-usage-stats", "--block"]
        self.processes: list[subprocess.Popen] = []
        self.start("head", "--head", f"--port={gcs}", f"--dashboard-port={self.dashboard}",
                   f"--ray-client-server-port={free_port()}", *node)
        self.wait_for_job_api()
        self.node_args = (f"--address={self.address}", *node)
        self.start("node", *self.node_args)
        self.nodes = self.wait_for_nodes(2)

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")
        self.processes.append(subprocess.Popen([BIN / "ray", "start", f"--temp-dir={self.root / name}", *args],
                                               env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def request(self, path: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            url = f"http://127.0.0.1:{self.dashboard}{path}"
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).status
        except (urllib.error.HTTPError) as e:
            return e.code

    def wait_for_job_api(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.request("/api/version", self.token.read_text()) == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the head's job API did not come up; see {self.root / 'head.log'}")

    def wait_for_nodes(self, count: int, timeout: float = 180) -> dict[str, str]:
        """node id → "head" or "node" (which `ray start` it is), once `count` nodes are alive."""
        code = (f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(json.dumps({n['NodeID']: n['RayletSocketName'] for n in ray.nodes() if n['Alive']}))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
            nodes = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else {}
            if len(nodes) == count:
                return {node_id: Path(socket_name).relative_to(self.root).parts[0] for node_id, socket_name in nodes.items()}
            time.sleep(2)
        raise TimeoutError(f"{count} nodes did not join; see {self.root}/*.log")

    def lose_node(self) -> list[psutil.Process]:
        """SIGKILL the second node's raylet, as when the machine goes away; returns the node's processes
        (those of its `ray start`), to be ended by `restore_node`."""
        tree = psutil.Process(self.processes[1].pid).children(recursive=True)
        next(p for p in tree if p.name() == "raylet").kill()
        return tree

    def restore_node(self, old: list[psutil.Process]) -> None:
        """End what is left of the lost node's processes, start the second node again and wait until it joined."""
        for p in old:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(old, timeout=30)
        self.processes[1].kill()  # its `ray start --block`
        self.processes[1].wait(timeout=30)
        self.start("node", *self.node_args)
        self.processes[1] = self.processes.pop()
        self.nodes = self.wait_for_nodes(2)

    def submit(self, out: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([SUBMIT, f"127.0.0.1:{self.dashboard}", CONFIG, out, *overrides], cwd=ROOT,
                              env=env or self.env, capture_output=True, text=True, timeout=600)

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node), then kill whatever of theirs is left."""
        ours = []
        for p in self.processes:
            try:
                ours += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.processes):
            p.terminate()
        _, alive = psutil.wait_procs(ours, timeout=30)
        for p in alive:
            p.kill()
        for p in self.processes:
            p.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    # a short root: Ray's unix sockets live below it and paths are limited to 107 characters
    two = TwoNodeCluster(Path(tempfile.mkdtemp(prefix="ct-ray-", dir="/tmp")), cpus_per_node=2)
    yield two
    two.stop()


def raylet_of(pid: int, cluster: TwoNodeCluster) -> str:
    """Which node's raylet started this worker process ("head" or "node"), from the process tree."""
    cmdline = " ".join(psutil.Process(pid).parent().cmdline())
    return re.search(rf"--raylet_socket_name={re.escape(str(cluster.root))}/(\w+)/", cmdline).group(1)


@pytest.mark.slow
def test_cluster_refuses_requests_without_the_token(cluster, tmp_path):
    assert cluster.request("/api/version", None) == 401
    assert cluster.request("/api/version", secrets.token_hex(32)) == 403
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    result = cluster.submit(tmp_path / "run", env=cluster.env | {"RAY_AUTH_TOKEN_PATH": str(wrong)})
    assert result.returncode != 0 and not (tmp_path / "run").exists()
    assert "Invalid authentication token" in result.stdout + result.stderr


@pytest.mark.slow
def test_job_too_big_for_the_cluster_fails_at_once_with_the_numbers(cluster, tmp_path):
    started = time.time()
    result = cluster.submit(tmp_path / "run", "--set", "workers.cpus_per_worker=3")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "failed with exit code 2" in output, output[-3000:]
    assert re.search(r"need 6 CPUs and 0 GPUs; the Ray cluster's 2 nodes \(.*: 2 CPU, 0 GPU; .*: 2 CPU, 0 GPU; "
                     r"total 4 CPUs, 0 GPUs\) hold 0 of them", output), output[-3000:]
    assert not (tmp_path / "run").exists()
    assert time.time() - started < 120  # a refusal, not a wait for resources that never come


@pytest.mark.slow
def test_job_runs_ranks_on_both_nodes_and_seals_its_checkpoint(cluster, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "submit.log"
    with open(log, "w") as f:
        job = subprocess.Popen([SUBMIT, f"127.0.0.1:{cluster.dashboard}", CONFIG, out, "--set", "schedule.max_steps=4",
                                "--set", "workers.placement=STRICT_SPREAD", "--set", "run.eval_interval=4"],
                               cwd=ROOT, env=cluster.env, stdout=f, stderr=subprocess.STDOUT)
    # While the workers live: which node's raylet started each rank (independent of what workers.json says).
    started_by = None
    while job.poll() is None and started_by is None:
        try:
            started_by = [raylet_of(pid, cluster) for pid in json.loads((out / "workers.json").read_text())["pids"]]
        except (FileNotFoundError, json.JSONDecodeError, psutil.NoSuchProcess, AttributeError):
            time.sleep(0.2)
    assert job.wait(timeout=600) == 0, log.read_text()[-5000:]

    recorded = json.loads((out / "workers.json").read_text())["nodes"]
    assert [cluster.nodes[r["node_id"]] for r in recorded] == started_by
    assert sorted(started_by) == ["head", "node"]  # a rank per node (PACK, the default, would fill one node)
    assert checkpoint.latest(out / "checkpoints").name == "step_00000004"
    checkpoint.validate(out / "checkpoints" / "step_00000004")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]

    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", log.read_text()).group(1)
    logs = subprocess.run([BIN / "ray", "job", "logs", job_id, "--address", f"http://127.0.0.1:{cluster.dashboard}"],
                          env=cluster.env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and "[curvtrain] done: step 4" in logs.stdout, logs.stdout[-3000:] + logs.stderr[-3000:]


@pytest.mark.slow
def test_losing_a_node_goes_on_with_the_heads_worker(cluster, tmp_path):
    """workers.min_workers=1, a worker per node (STRICT_SPREAD): the second node's raylet is killed once a
    checkpoint is sealed. The coordinator restarts from the last sealed checkpoint with the one worker the
    head holds, accumulating 2 micro-batches where 2 workers took one each, and the job finishes with
    every step logged once and the change recorded at the step it went on from. (ZeRO 0: its checkpoint
    loads at any worker count.) The second node is started again afterwards."""
    out, log = tmp_path / "run", tmp_path / "submit.log"
    with open(log, "w") as f:
        job = subprocess.Popen([SUBMIT, f"127.0.0.1:{cluster.dashboard}", CONFIG, out, "--set", "workers.placement=STRICT_SPREAD",
                                "--set", "workers.min_workers=1", "--set", "engine.zero_stage=0", "--set", "schedule.max_steps=30",
                                "--set", "run.checkpoint_interval=5", "--set", "run.eval_interval=30"],
                               cwd=ROOT, env=cluster.env, stdout=f, stderr=subprocess.STDOUT)
    lost, sealed = None, None
    try:
        while job.poll() is None and lost is None:
            sealed = checkpoint.latest(out / "checkpoints")
            if sealed is None:
                time.sleep(0.05)
            else:
                lost = cluster.lose_node()
        assert job.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if lost is not None:
            cluster.restore_node(lost)
    assert lost is not None, "the run finished before a checkpoint was sealed"

    records = read_metrics(out)
    assert [r["step"] for r in records if "event" not in r] == list(range(1, 31))  # each step once
    events = [r for r in records if "event" in r]
    assert len(events) == 1, events
    went_on_from = events[0]["step"]
    assert events[0] == {"step": went_on_from, "event": "workers", "num_workers": 1, "was": 2, "grad_accum": 2, "target": 2}
    assert checkpoint.step_of(sealed) <= went_on_from < 30 and went_on_from % 5 == 0
    assert records.index(events[0]) == went_on_from  # right after the record of the step it went on from
    workers = json.loads((out / "workers.json").read_text())
    assert workers["attempt"] == 1 and [cluster.nodes.get(n["node_id"], "lost") for n in workers["nodes"]] == ["head"]
    assert checkpoint.validate(out / "checkpoints" / "step_00000030")["world_size"] == 1
    output = log.read_text()
    assert re.search(r"\[curvtrain\] worker lost \(.*\); restarting from \S+step_0*" + str(went_on_from), output), output[-5000:]
    assert "[curvtrain] workers: 2 → 1, the most the live cluster holds of workers.num_workers=2" in output, output[-5000:]
    assert "[curvtrain] done: step 30" in output, output[-5000:]


@pytest.mark.slow
def test_ranks_that_see_different_run_dirs_stop_before_any_checkpoint(cluster, tmp_path):
    """A relative RUN_DIR (submitted with `ray job submit` itself: scripts/submit.sh refuses one) is resolved
    in each node's own copy of the job's working directory: two folders, as with a RUN_DIR that is not on
    shared storage. The shared-storage check stops every rank at start-up, naming the rank whose marker
    rank 0 does not see, its node and its folder; no checkpoint is written anywhere."""
    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(CONFIG, job / "config.yaml")
    result = subprocess.run([BIN / "ray", "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}", "--working-dir",
                             job, "--", "curvtrain", "pretrain", "--config", "config.yaml", "--out", "run", "--address", "auto",
                             "--set", "workers.placement=STRICT_SPREAD", "--set", "schedule.max_steps=4"],
                            env=cluster.env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-5000:]
    found = re.search(r"RUN_DIR is not one shared folder: rank 0 \(node \S+ \((\w{8})\), (\S+)\) does not see the "
                      r"markers of rank 1 on node \S+ \((\w{8})\) writes to (\S+)\.", output)
    assert found, output[-5000:]
    by_prefix = {node_id[:8]: name for node_id, name in cluster.nodes.items()}
    assert sorted([by_prefix[found[1]], by_prefix[found[3]]]) == ["head", "node"]
    rank0_dir, rank1_dir = Path(found[2]), Path(found[4])
    assert rank0_dir != rank1_dir and rank0_dir.name == rank1_dir.name == "run"
    assert len(list(rank1_dir.glob(".ranks/*/rank1"))) == 1  # rank 1 wrote its marker, in its own folder
    assert not list(rank0_dir.glob("checkpoints/*")) and not list(rank1_dir.glob("checkpoints/*"))


@pytest.mark.slow
def test_federated_job_runs_client_actors_on_both_nodes(cluster, tmp_path):
    """`curvtrain federate` as a cluster job: pool.num_actors=0 starts one client actor per CPU slot of the
    whole cluster (2 nodes × 2 CPUs), so actors run on both nodes; the run seals its checkpoint. The data is a
    .npz the test generates, so the test needs no Fashion-MNIST (Debian's dataset-fashion-mnist)."""
    out = tmp_path / "fed"
    npz = make_npz(tmp_path / "blobs.npz")
    result = subprocess.run([FEDERATE, f"127.0.0.1:{cluster.dashboard}", ROOT / "configs" / "fed-smoke.yaml", out,
                             "--set", "data.name=npz", "--set", f"data.path={npz}", "--set", "data.partition=iid",
                             "--set", "model.name=mlp", "--set", "model.hidden=16", "--set", "pool.num_actors=0", "--set", "run.rounds=2", "--set", "run.eval_interval=2",
                             "--set", "run.checkpoint_interval=2"],
                            cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    actors = [cluster.nodes[n["node_id"]] for n in json.loads((out / "workers.json").read_text())["nodes"]]
    assert sorted(actors) == ["head", "head", "node", "node"]
    assert checkpoint.latest(out / "checkpoints").name == "step_00000002"
    checkpoint.validate(out / "checkpoints" / "step_00000002")
    assert [r["round"] for r in read_metrics(out) if "round" in r] == [1, 2]
    assert "[curvtrain] done: round 2" in output, output[-3000:]


JOIN = """
import json, os, ray
from curvtrain.launcher.cluster import connect
auth = lambda: {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}
before = auth()
try:
    result = [connect("auto", num_cpus_needed=1), len([n for n in ray.nodes() if n["Alive"]])]
except Exception as e:
    result = type(e).__name__
print(json.dumps({"result": result, "env_unchanged": auth() == before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("auth, result", [({"RAY_AUTH_MODE": "token"}, [False, 2]), ({}, "ConnectionError")])
def test_joining_leaves_authentication_to_the_user(cluster, tmp_path, auth, result):
    """The token sits in Ray's default file ~/.ray/auth_token. With RAY_AUTH_MODE=token, joining the cluster
    (RAY_ADDRESS, `--address auto`) authenticates; without it Ray refuses to guess for an explicit address.
    Either way `connect` adds nothing to the environment (it used to set RAY_AUTH_MODE=disabled)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    shutil.copy(cluster.token, home / ".ray" / "auth_token")
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    env.update(auth, HOME=str(home), RAY_ADDRESS=cluster.address)
    out = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"result": result, "env_unchanged": True}, out.stderr[-3000:]
