"""What the clients train and the server evaluates: a model, each client's batches, a loss, a test metric.

    Classification   models.datasets (Fashion-MNIST, .npz) partitioned by label (iid, dirichlet, classes);
                     the CNN or MLP of models.vision; test loss and accuracy on the test split
    Text             the corpus's token file (models.data, tokenized once and cached), its training region
                     cut at document ends (EOS) into runs of documents, one run per client; the LLaMA of
                     models.llama; test loss on the held-out validation region

Which samples client i reads in round t is a pure function of (data.seed, run seed, t, i), so any actor
computes the same batches and a resumed run reads what an uninterrupted one would.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from curvtrain.distributed.federated import partition
from curvtrain.distributed.federated.config import FederatedConfig
from curvtrain.models.data import TokenData, model_config, prepare_tokens
from curvtrain.models.datasets import LOADERS, DataError
from curvtrain.models.llama import LlamaForCausalLM
from curvtrain.models.vision import VISION_MODELS

EVAL_BATCH = 1000  # classification test samples per forward pass


def _order(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` positions in 0..size-1: successive seeded permutations (epochs) of the client's samples."""
    epochs = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(epochs)])[:count]


class ClassificationWorkload:
    def __init__(self, cfg: FederatedConfig):
        self.cfg = cfg
        d = cfg.data
        self.data = LOADERS[d.name](d.path)
        n, clients = len(self.data.y_train), cfg.clients.num_clients
        self.clients = {
            "iid": lambda: partition.iid(n, clients, d.seed),
            "dirichlet": lambda: partition.dirichlet(self.data.y_train, clients, d.alpha, d.seed),
            "classes": lambda: partition.classes(self.data.y_train, clients, d.classes_per_client, d.seed),
        }[d.partition]()
        self.x_train, self.y_train = torch.from_numpy(self.data.x_train), torch.from_numpy(self.data.y_train)

    def build_model(self) -> nn.Module:
        cls = VISION_MODELS[self.cfg.model.name]
        extra = {"hidden": self.cfg.model.hidden} if self.cfg.model.name == "mlp" else {}
        return cls(self.data.feature_shape, self.data.num_classes, **extra)

    def client_batches(self, client: int, round_: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        local = self.cfg.local
        idx = self.clients[client]
        per_step = min(local.batch_size, len(idx))
        rng = np.random.default_rng((self.cfg.data.seed, self.cfg.run.seed, round_, client))
        picks = idx[_order(len(idx), local.steps * per_step, rng)].reshape(local.steps, per_step)
        return [(self.x_train[p], self.y_train[p]) for p in picks]

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        model.eval()
        limit = self.cfg.run.eval_samples or len(self.data.y_test)
        x, y = torch.from_numpy(self.data.x_test[:limit]), torch.from_numpy(self.data.y_test[:limit])
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y), EVAL_BATCH):
            logits = model(x[start:start + EVAL_BATCH])
            target = y[start:start + EVAL_BATCH]
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
        return {"test_loss": loss_sum / len(y), "test_accuracy": correct / len(y)}


class TextWorkload:
    def __init__(self, cfg: FederatedConfig):
        self.cfg = cfg
        text = cfg.data.text
        token_dir = prepare_tokens(text)
        meta = json.loads((token_dir / "meta.json").read_text())
        self.tokens = TokenData(token_dir, text.seq_len, text.val_fraction, text.seed)
        # document runs of the training region: document j spans [starts[j], ends[j]) (its EOS included)
        region = self.tokens.train_tokens
        ends = np.flatnonzero(np.asarray(region) == meta["eos_id"]) + 1
        if not len(ends) or ends[-1] < len(region):
            ends = np.append(ends, len(region))  # the document cut by the validation region
        starts = np.concatenate([[0], ends[:-1]])
        if cfg.clients.num_clients > len(ends):
            raise DataError(f"clients.num_clients={cfg.clients.num_clients} exceeds the {len(ends)} documents in the "
                            f"training region of corpus {text.corpus!r}: each client needs one document at least")
        L = text.seq_len
        self.spans = []  # per client: first token, number of seq_len chunks in its run of documents
        for i, docs in enumerate(partition.documents(len(ends), cfg.clients.num_clients)):
            first, last = int(starts[docs[0]]), int(ends[docs[-1]])
            chunks = (last - first - 1) // L
            if chunks < 1:
                raise DataError(f"client {i}'s documents hold {last - first} tokens, fewer than one sequence of "
                                f"seq_len + 1 = {L + 1}: use fewer clients.num_clients or a shorter data.text.seq_len")
            self.spans.append((first, chunks))

    def build_model(self) -> nn.Module:
        return LlamaForCausalLM(model_config(self.cfg.model.llama, self.cfg.data.text))

    def client_batches(self, client: int, round_: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        local = self.cfg.local
        first, chunks = self.spans[client]
        rng = np.random.default_rng((self.cfg.data.seed, self.cfg.run.seed, round_, client))
        per_step = min(local.batch_size, chunks)
        picks = _order(chunks, local.steps * per_step, rng).reshape(local.steps, per_step)
        return [self.tokens.read(first, p) for p in picks]

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0], batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        model.eval()
        total, count = 0.0, 0
        limit = self.cfg.run.eval_samples or None
        micro = min(self.cfg.local.batch_size, limit or self.cfg.local.batch_size, self.tokens.num_val_samples)
        for inputs, targets in self.tokens.val_batches(micro, 0, 1, limit):
            total += model(inputs, targets).item() * targets.numel()
            count += targets.numel()
        return {"test_loss": total / count}


def build_workload(cfg: FederatedConfig):
    """Loads the data (a missing file is a DataError naming it) and plans the clients."""
    return (TextWorkload if cfg.data.name == "text" else ClassificationWorkload)(cfg)
