"""Split training examples across clients: IID, Dirichlet label skew, or natural groups.

Each partitioner returns a list of index arrays, one per client, that together cover every
training example exactly once. All randomness comes from the ``seed`` argument.
"""

from __future__ import annotations

import numpy as np

from privlora.tasks.data import DataError, LabelledData


def partition_iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal into num_clients near-equal shards."""
    if n < num_clients:
        raise DataError(f"data.num_clients: {num_clients} clients but only {n} training examples")
    order = np.random.default_rng([seed, 0x11D]).permutation(n)
    return [np.sort(s) for s in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: for each class, split its examples by proportions drawn from Dir(alpha).

    Small alpha gives each client few classes; alpha -> inf approaches IID. Redraws (up to 100
    times) until every client holds at least ``min_size`` examples.
    """
    rng = np.random.default_rng([seed, 0xD1A])
    classes = np.unique(labels)
    if len(labels) < num_clients * min_size:
        raise DataError(f"data.num_clients: {num_clients} clients need at least {num_clients * min_size} examples, found {len(labels)}")
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise DataError(
        f"data.dirichlet_alpha: alpha={alpha} left some client with fewer than {min_size} examples "
        "after 100 draws; raise alpha or lower data.num_clients"
    )


def partition_natural(groups: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Keep each group (e.g. a movie) whole and give groups to clients, balancing sizes.

    Groups are shuffled with the seed, then each goes to the client with the fewest examples so
    far (largest groups first), so clients differ in which movies they saw, not in size.
    """
    uniq, counts = np.unique(groups, return_counts=True)
    if len(uniq) < num_clients:
        raise DataError(f"data.num_clients: {num_clients} clients but only {len(uniq)} groups in data.group_column")
    rng = np.random.default_rng([seed, 0x9A7])
    perm = rng.permutation(len(uniq))
    order = perm[np.argsort(-counts[perm], kind="stable")]
    loads = np.zeros(num_clients, dtype=np.int64)
    owner = np.empty(len(uniq), dtype=np.int64)
    for g in order:
        k = int(np.argmin(loads))
        owner[g] = k
        loads[k] += counts[g]
    group_index = np.searchsorted(uniq, groups)
    client_of_example = owner[group_index]
    return [np.flatnonzero(client_of_example == k) for k in range(num_clients)]


def partition(data: LabelledData, scheme: str, num_clients: int, seed: int, alpha: float = 0.5) -> list[np.ndarray]:
    if scheme == "iid":
        return partition_iid(len(data), num_clients, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(data.labels, num_clients, alpha, seed)
    if scheme == "natural":
        if data.groups is None:
            raise DataError("data.group_column: the natural partition needs a group column")
        return partition_natural(data.groups, num_clients, seed)
    raise DataError(f"data.partition: {scheme!r} is not one of 'iid', 'dirichlet', 'natural'")
