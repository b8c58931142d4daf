"""`curvtrain federate` end to end on real Ray actors (CPU), with a small generated .npz data set."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

from curvtrain.distributed.federated import partition
from curvtrain.distributed.federated.config import FederatedConfig
from curvtrain.distributed.federated.server import FederatedServer
from curvtrain.distributed.metrics import read_metrics
from curvtrain.launcher.config import load_config
from curvtrain.models.datasets import FASHION_MNIST_DIR, DataError, load_fashion_mnist, load_npz

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "fed-smoke.yaml"
FEATURES, CLASSES = (6, 6), 4


def make_npz(path: Path, n_train=400, n_test=200, nan_rows=(), seed=0) -> Path:
    """Gaussian blobs, one per label, with features of shape FEATURES (any shape works)."""
    rng = np.random.default_rng(seed)
    centers = 1.5 * rng.normal(size=(CLASSES, *FEATURES))

    def split(n):
        y = rng.integers(0, CLASSES, n)
        return (centers[y] + rng.normal(size=(n, *FEATURES))).astype(np.float32), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    x_train[np.asarray(nan_rows, dtype=np.int64)] = np.nan
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def config(npz: Path, *overrides: str) -> FederatedConfig:
    base = [
        "data.name=npz", f"data.path={npz}", "data.partition=iid", "model.name=mlp", "model.hidden=16",
        "local.steps=3", "local.batch_size=10", "local.optimizer.lr=0.3", "clients.num_clients=8", "clients.per_round=4",
        "pool.num_actors=2", "run.rounds=4", "run.checkpoint_interval=2", "algorithm.name=fedspeed",
    ]
    return load_config(FederatedConfig, None, base + list(overrides))


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return make_npz(tmp_path_factory.mktemp("data") / "blobs.npz")


def run(cfg, run_dir: Path, resume=False, server_cls=FederatedServer) -> dict:
    return server_cls(cfg, run_dir, resume=resume).run()


@pytest.mark.slow
def test_same_seed_same_model_and_resume_equals_uninterrupted(ray_runtime, npz, tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    run(config(npz), a)
    run(config(npz), b)
    assert files(a / "checkpoints" / "step_00000004") == files(b / "checkpoints" / "step_00000004")

    run(config(npz, "run.rounds=2"), c)  # stopped after round 2, then continued to round 4
    run(config(npz), c, resume=True)
    final = files(c / "checkpoints" / "step_00000004")
    assert final == files(a / "checkpoints" / "step_00000004")
    assert any(name.startswith("client_state/") for name in final)  # FedSpeed's ĝᵢ were resumed too
    assert [r["test_loss"] for r in read_metrics(c)] == [r["test_loss"] for r in read_metrics(a)]
    assert read_metrics(a)[-1]["test_accuracy"] > 0.8  # the blobs are easy: the run does learn


class KillsAnActor(FederatedServer):
    """Kills the actor that has just been handed the first client of round 2, mid-round."""

    def dispatch(self, actor, client, round_, *args):
        ref = super().dispatch(actor, client, round_, *args)
        if round_ == 1 and not hasattr(self, "killed"):
            ray.kill(actor, no_restart=True)
            self.killed = client
        return ref


@pytest.mark.slow
def test_a_raising_client_and_a_killed_actor_do_not_stop_the_run(ray_runtime, tmp_path):
    # client 5's features are missing (NaN): its local training diverges and raises, every round
    bad_client = 5
    data = make_npz(tmp_path / "bad.npz", nan_rows=partition.iid(400, 8, seed=0)[bad_client])
    cfg = config(data, "clients.per_round=8", "clients.min_clients=5", "algorithm.name=scaffold")
    server = KillsAnActor(cfg, tmp_path / "run")
    summary = server.run()
    records = read_metrics(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3, 4] and summary["round"] == 4
    assert all(bad_client in r["dropped"] for r in records)
    assert records[1]["dropped"] == sorted({bad_client, server.killed}) and records[1]["clients"] == 6
    assert [r["clients"] for r in records[2:]] == [7, 7]  # the replacement actor takes its share
    assert np.isfinite(records[-1]["test_loss"])


@pytest.mark.slow
def test_a_round_below_min_clients_is_retried_then_fails(ray_runtime, tmp_path):
    parts = partition.iid(400, 8, seed=0)
    data = make_npz(tmp_path / "bad.npz", nan_rows=np.concatenate([parts[5], parts[6]]))
    cfg = config(data, "clients.per_round=8", "clients.min_clients=7", "clients.max_retries=1", "algorithm.name=fedavg")
    from curvtrain.distributed.federated.server import RoundFailed

    with pytest.raises(RoundFailed, match="min_clients=7"):
        run(cfg, tmp_path / "run")


@pytest.mark.slow
def test_client_state_memory_does_not_grow_with_the_number_of_clients(ray_runtime, tmp_path):
    data = make_npz(tmp_path / "many.npz", n_train=2000)
    held = {}
    for clients in (100, 1000):
        out = tmp_path / f"n{clients}"
        cfg = config(data, f"clients.num_clients={clients}", "clients.per_round=10", "algorithm.name=scaffold",
                     "run.rounds=3", "run.checkpoint_interval=3", "local.batch_size=2")
        server = FederatedServer(cfg, out)
        server.check()
        dim = server.x.numel()
        server.run()
        held[clients] = {r["client_state_bytes"] for r in read_metrics(out)}
        trained = len({c for t in range(3) for c in partition.sample_clients(clients, 10, 0, t)})
        assert len(list((out / "client_state").iterdir())) == trained  # on disk: only clients that trained
        assert held[clients] == {10 * dim * 4}  # in memory: the round's 10 cᵢ, nothing per client
    assert held[100] == held[1000]


def curvtrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "curvtrain.launcher", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--set", "clients.per_round=0"], "clients: per_round must be in [1, num_clients=20]"),
    (["--set", "algorithm.name=fedsgd"], "algorithm: name must be one of fedavg, fedprox, scaffold, fedspeed"),
    (["--set", "model.name=llama"], "model.name='llama' does not fit data.name='fmnist'"),
    (["--set", "data.path=/no/such/dir"], "Fashion-MNIST file not found: /no/such/dir/train-images-idx3-ubyte.gz"),
    (["--set", "data.name=npz", "--set", "data.path=/no/such.npz"], "data file not found: /no/such.npz"),
    (["--resume"], "no checkpoint"),
    # the local step runs forward, backward and step: optimizers that need more are refused before Ray starts
    (["--set", "local.optimizer.name=adahessian"], "local: optimizer.name=adahessian needs a curvature estimate every k steps"),
    (["--set", "local.optimizer.name=sophia"], "local: optimizer.name=sophia needs a curvature estimate every k steps"),
    (["--set", "local.optimizer.name=mfac", "--set", "local.optimizer.mfac.damping=gns", "--set", "local.optimizer.weight_decay=0"],
     "local: optimizer.name=mfac needs a closure that re-evaluates its batch"),
])
def test_bad_configs_exit_2_naming_the_field_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = curvtrain("federate", "--config", str(SMOKE), "--out", str(out), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_npz_loader_takes_any_feature_shape_and_checks_labels(tmp_path):
    path = tmp_path / "img.npz"
    x = np.zeros((10, 3, 12, 12), np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(10) % 3, x_test=x[:4], y_test=np.arange(4) % 3)
    data = load_npz(path)
    assert data.feature_shape == (3, 12, 12) and data.num_classes == 3 and data.x_train.dtype == np.float32
    np.savez(path, x_train=x, y_train=np.linspace(0, 1, 10), x_test=x[:4], y_test=np.arange(4))
    with pytest.raises(DataError, match="y_train must be a 1-D array of integer labels"):
        load_npz(path)
    np.savez(path, x_train=x, y_train=np.arange(10))
    with pytest.raises(DataError, match="lacks array x_test"):
        load_npz(path)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_the_debian_package():
    data = load_fashion_mnist()
    assert data.x_train.shape == (60000, 28, 28) and data.x_test.shape == (10000, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10 and np.bincount(data.y_test).tolist() == [1000] * 10
    assert abs(float(data.x_train.mean())) < 1e-3 and abs(float(data.x_train.std()) - 1) < 1e-3


def test_text_clients_hold_disjoint_runs_of_documents():
    from curvtrain.distributed.federated.workload import TextWorkload

    cfg = load_config(FederatedConfig, None, ["data.name=text", "data.partition=documents", "model.name=llama",
                                              "clients.num_clients=10", "local.steps=3", "local.batch_size=4"])
    w = TextWorkload(cfg)
    tokens, L = w.tokens.train_tokens, cfg.data.text.seq_len
    spans = [(first, first + chunks * L + 1) for first, chunks in w.spans]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # disjoint, in corpus order
    assert spans[0][0] == 0 and spans[-1][1] <= len(tokens)
    for client in (0, 9):
        inputs, targets = w.client_batches(client, round_=0)[0]
        first, end = spans[client]
        window = np.asarray(tokens[first:end])
        for row in inputs.numpy():  # every sequence is a slice of the client's own documents
            assert any(np.array_equal(window[s:s + L], row) for s in range(0, len(window) - L, L))
    assert np.array_equal(w.client_batches(3, 1)[0][0], w.client_batches(3, 1)[0][0])
    assert not np.array_equal(w.client_batches(3, 1)[0][0], w.client_batches(3, 2)[0][0])
