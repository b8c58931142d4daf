"""Which client holds which samples, and which clients train in a round: plans as plain data from
pure functions of (labels or document count, number of clients, seed), so the server computes them once,
the actors compute the same ones, and tests check them without processes.

A partition is a list, one entry per client, of sample indices; every sample belongs to exactly one client.

    iid            shuffled samples, dealt in equal shares          client 0: [·····]  client 1: [·····]
    dirichlet(α)   equal shares; client i's label mix qᵢ ~ Dir(α)   client 0: mostly 3, 7  client 1: mostly 0
                   (Hsu et al. 2019; FL-Simulator's construction; α → 0 one label each, α → ∞ IID)
    classes(k)     client i holds k labels; each label's samples split evenly among its holders (McMahan 2017)
    documents      text: client i holds a run of consecutive source documents (a natural non-IID split)
"""
from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "classes", "documents")


def _shares(total: int, num_clients: int) -> np.ndarray:
    """Equal shares of `total` items (the first total mod N clients get one more)."""
    if not 1 <= num_clients <= total:
        raise ValueError(f"num_clients must be in [1, {total}] (one item at least per client), got {num_clients}")
    return np.full(num_clients, total // num_clients) + (np.arange(num_clients) < total % num_clients)


def iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng((seed, 0)).permutation(num_samples)
    return np.split(order, np.cumsum(_shares(num_samples, num_clients))[:-1])


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Equal-size clients whose label proportions qᵢ are drawn from Dir(α·1): each client in turn draws its
    share from the labels still available, renormalizing qᵢ over them when a label runs out."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng((seed, 1))
    classes, labels = np.unique(labels, return_inverse=True)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(classes))]
    taken = np.zeros(len(classes), dtype=np.int64)
    mix = rng.dirichlet(np.full(len(classes), alpha), size=num_clients)
    out = []
    for i, need in enumerate(_shares(len(labels), num_clients)):
        parts = []
        while need > 0:
            left = np.array([len(p) for p in pools]) - taken
            q = mix[i] * (left > 0)
            q = q / q.sum() if q.sum() > 0 else (left > 0) / (left > 0).sum()
            counts = np.minimum(rng.multinomial(need, q), left)
            for c in np.flatnonzero(counts):
                parts.append(pools[c][taken[c]:taken[c] + counts[c]])
                taken[c] += counts[c]
            need -= counts.sum()
        out.append(np.sort(np.concatenate(parts)))
    return out


def classes(labels: np.ndarray, num_clients: int, k: int, seed: int) -> list[np.ndarray]:
    """Client i holds labels (π(i·k), ..., π(i·k + k − 1)) mod C for a seeded permutation π of the C labels,
    so every label has ⌊N·k/C⌋ or ⌈N·k/C⌉ holders; each label's samples are dealt evenly among its holders."""
    rng = np.random.default_rng((seed, 2))
    names, labels = np.unique(labels, return_inverse=True)
    num_classes = len(names)
    if not 1 <= k <= num_classes or num_clients * k < num_classes:
        raise ValueError(f"classes per client must be in [1, {num_classes}] with num_clients × k ≥ {num_classes} "
                         f"(every label needs a holder), got k={k} for {num_clients} clients")
    order = rng.permutation(num_classes)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for i in range(num_clients):
        for j in range(k):
            holders[order[(i * k + j) % num_classes]].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(labels == c))
        for client, share in zip(holders[c], np.array_split(pool, len(holders[c]))):
            parts[client].append(share)
    return [np.sort(np.concatenate(p)) for p in parts]


def documents(num_docs: int, num_clients: int) -> list[np.ndarray]:
    """Client i holds a run of consecutive documents (equal counts ± 1), in corpus order."""
    return np.split(np.arange(num_docs), np.cumsum(_shares(num_docs, num_clients))[:-1])


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int, attempt: int = 0) -> list[int]:
    """The clients of one round (attempt > 0: a retried round draws afresh), without replacement, sorted."""
    rng = np.random.default_rng((seed, 3, round_, attempt))
    return sorted(int(i) for i in rng.choice(num_clients, size=per_round, replace=False))
