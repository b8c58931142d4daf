"""The typed configuration of a federated simulation (`curvtrain federate`).

Each section validates its own fields in __post_init__, naming the field; `FederatedConfig` checks the
combinations (a LLaMA model needs text data, a round cannot take more clients than exist, ...).
`launcher.config.load_config(FederatedConfig, ...)` builds it from YAML and `--set` overrides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from curvtrain.distributed.config import CheckpointedRunConfig
from curvtrain.distributed.federated import partition
from curvtrain.distributed.federated.algorithms import ALGORITHMS, Algorithm, FedProx, FedSpeed, Scaffold
from curvtrain.models.data import DataConfig
from curvtrain.models.llama import LLAMA_CONFIGS
from curvtrain.models.vision import VISION_MODELS
from curvtrain.optim import OPTIMIZERS, Needs, OptimizerConfig

DATASETS = ("fmnist", "npz", "text")


@dataclass(kw_only=True)
class AlgorithmConfig:
    name: str = "fedavg"
    """fedavg | fedprox | scaffold | fedspeed."""
    server_lr: float = 1.0
    """η_g: the server moves the global model by η_g × the aggregated update (1 = plain averaging)."""
    mu: float = 0.01
    """FedProx: weight μ of the proximal term (μ/2)‖x − xᵗ‖²."""
    rho: float = 0.1
    """FedSpeed: radius ρ of the sharpness-aware perturbation (0 disables it)."""
    lam: float = 10.0
    """FedSpeed: λ, the proximal term's weight is 1/λ (the official code's λ = 0.1 is our 1/λ)."""
    alpha: float = 1.0
    """FedSpeed: g̃ = (1−α)·g + α·g_perturbed (the official code uses α = 1)."""

    def __post_init__(self):
        if self.name not in ALGORITHMS:
            raise ValueError(f"name must be one of {', '.join(ALGORITHMS)}, got {self.name!r}")
        for name in ("server_lr", "lam"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")
        for name in ("mu", "rho"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def build(self) -> Algorithm:
        """The one choice point from the config to an algorithm."""
        return {
            "fedavg": lambda: Algorithm(server_lr=self.server_lr),
            "fedprox": lambda: FedProx(mu=self.mu, server_lr=self.server_lr),
            "scaffold": lambda: Scaffold(server_lr=self.server_lr),
            "fedspeed": lambda: FedSpeed(rho=self.rho, lam=self.lam, alpha=self.alpha, server_lr=self.server_lr),
        }[self.name]()


@dataclass(kw_only=True)
class FedDataConfig:
    name: str = "fmnist"
    """fmnist (Fashion-MNIST IDX files), npz (x_train, y_train, x_test, y_test arrays) or text (the corpus)."""
    path: str = ""
    """fmnist: the directory of the four IDX .gz files (default /usr/share/datasets/fashion-mnist, Debian's
    dataset-fashion-mnist); npz: the .npz file (required). Unused for text (see `text`)."""
    partition: str = "dirichlet"
    """iid | dirichlet | classes (classification); documents (text: a run of source documents per client)."""
    alpha: float = 0.3
    """Dirichlet concentration α of each client's label mix (smaller: more skewed)."""
    classes_per_client: int = 2
    """Labels per client for partition=classes."""
    seed: int = 0
    """Seeds the partition (the run's seed seeds the model and the client sampling)."""
    text: DataConfig = field(default_factory=lambda: DataConfig(seq_len=64))
    """Corpus, tokenizer and sequence length for name=text (curvtrain.models.data)."""

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"name must be one of {', '.join(DATASETS)}, got {self.name!r}")
        if self.partition not in partition.PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(partition.PARTITIONS)}, got {self.partition!r}")
        if (self.name == "text") != (self.partition == "documents"):
            raise ValueError(f"partition={self.partition!r} does not apply to name={self.name!r}: text data is split "
                             "by documents, classification data by iid, dirichlet or classes")
        if self.name == "npz" and not self.path:
            raise ValueError("path must name the .npz file for name=npz")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.classes_per_client < 1:
            raise ValueError(f"classes_per_client must be ≥ 1, got {self.classes_per_client}")


@dataclass(kw_only=True)
class FedModelConfig:
    name: str = "cnn"
    """cnn or mlp (classification; models.vision), llama (text; models.llama)."""
    hidden: int = 200
    """Width of the MLP's hidden layers (the CNN's dense layer has 64)."""
    llama: str = "tiny"
    """Named LLaMA shape for name=llama (models.llama.LLAMA_CONFIGS: tiny, 20m, ...)."""

    def __post_init__(self):
        if self.name not in (*VISION_MODELS, "llama"):
            raise ValueError(f"name must be one of {', '.join((*VISION_MODELS, 'llama'))}, got {self.name!r}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be ≥ 1, got {self.hidden}")
        if self.llama not in LLAMA_CONFIGS:
            raise ValueError(f"llama must be one of {sorted(LLAMA_CONFIGS)}, got {self.llama!r}")


def runs_locally(needs: Needs) -> bool:
    """Whether a client's local step (forward, backward, the optimizer's step: nothing more) gives this
    optimizer what it needs (registry `Needs`)."""
    return needs.estimate is None and not needs.closure


@dataclass(kw_only=True)
class LocalConfig:
    steps: int = 20
    """K: local optimizer steps per client per round (the same local work for every client)."""
    batch_size: int = 50
    """Samples (sequences for text) per local step."""
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="sgd", lr=0.1, weight_decay=1e-3))
    """The base optimizer (curvtrain.optim registry), fresh for each client round; SGD as the papers use."""
    lr_decay: float = 1.0
    """The local learning rate of round t is optimizer.lr × lr_decay^t (FL-Simulator: 0.998)."""
    grad_clip: float = 10.0
    """Clip the norm of each local direction (FL-Simulator: 10); 0 disables."""

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be ≥ 0, got {self.grad_clip}")
        needs = self.optimizer.needs
        if not runs_locally(needs):
            what = "a curvature estimate every k steps" if needs.estimate is not None else "a closure that re-evaluates its batch"
            runnable = sorted(n for n, e in OPTIMIZERS.items()  # at their defaults; DeepSpeed-built ones never
                              if e.deepspeed is None and runs_locally(e.needs(OptimizerConfig(name=n))))
            raise ValueError(f"optimizer.name={self.optimizer.name} needs {what}, which a federated client's local "
                             f"steps do not run: choose one of {', '.join(runnable)}")
        if self.optimizer.deepspeed_section is not None:
            raise ValueError(f"optimizer.name={self.optimizer.name} is built by a DeepSpeed engine, which clients do not run")


@dataclass(kw_only=True)
class ClientsConfig:
    num_clients: int = 100
    """N: clients the training data is partitioned into (text: at most the number of documents)."""
    per_round: int = 10
    """Clients sampled (without replacement) each round."""
    min_clients: int = 1
    """A round that gets fewer results (clients dropped by errors or lost actors) is retried."""
    max_retries: int = 3
    """Retries of one round (each draws a fresh sample of clients) before the run stops."""

    def __post_init__(self):
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be ≥ 1, got {self.num_clients}")
        if not 1 <= self.per_round <= self.num_clients:
            raise ValueError(f"per_round must be in [1, num_clients={self.num_clients}], got {self.per_round}")
        if not 1 <= self.min_clients <= self.per_round:
            raise ValueError(f"min_clients must be in [1, per_round={self.per_round}], got {self.min_clients}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be ≥ 0, got {self.max_retries}")


@dataclass(kw_only=True)
class PoolConfig:
    num_actors: int = 0
    """Client actors (processes), each running many virtual clients; 0: one per cpus_per_actor CPUs of the cluster."""
    cpus_per_actor: int = 1
    """CPU cores reserved for (and torch threads used by) each actor."""
    use_gpu: bool = False
    """One GPU per actor."""

    def __post_init__(self):
        if self.num_actors < 0:
            raise ValueError(f"num_actors must be ≥ 0, got {self.num_actors}")
        if self.cpus_per_actor < 1:
            raise ValueError(f"cpus_per_actor must be ≥ 1, got {self.cpus_per_actor}")


@dataclass(kw_only=True)
class FedRunConfig(CheckpointedRunConfig):
    rounds: int = 50
    """Communication rounds."""
    eval_interval: int = 1
    eval_samples: int = 0
    """Test samples (sequences for text) per evaluation, the first ones; 0 = the whole test set."""
    checkpoint_interval: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.rounds < 1:
            raise ValueError(f"rounds must be ≥ 1, got {self.rounds}")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be ≥ 0, got {self.eval_samples}")


@dataclass(kw_only=True)
class FederatedConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: FedDataConfig = field(default_factory=FedDataConfig)
    model: FedModelConfig = field(default_factory=FedModelConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    run: FedRunConfig = field(default_factory=FedRunConfig)

    def __post_init__(self):
        if (self.model.name == "llama") != (self.data.name == "text"):
            raise ValueError(f"model.name={self.model.name!r} does not fit data.name={self.data.name!r}: "
                             "the llama model trains on text, cnn and mlp on classification data")
