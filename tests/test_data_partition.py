"""Partitioners: coverage, disjointness, determinism, the skew they promise, and their errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from aflora.data import (
    PARTITION_SCHEMES,
    partition,
    partition_dirichlet,
    partition_fedit_epsilon,
    partition_iid,
    partition_k_labels,
    partition_presplit,
    split_public,
)

NUM_ROWS = 4000
LABELS = [row % 4 for row in range(NUM_ROWS)]  # 4 balanced classes
CATEGORIES = [f"category_{row % 8}" for row in range(NUM_ROWS)]


def assert_exact_cover(clients, indices):
    flat = [index for client in clients for index in client]
    assert len(flat) == len(set(flat)), "a row was given to two clients"
    assert sorted(flat) == sorted(indices), "union of clients must equal the input"
    assert all(client == sorted(client) for client in clients), "indices must be sorted within a client"
    assert all(client for client in clients), "every client needs at least one row"


SCHEMES = {
    "iid": dict(),
    "dirichlet": dict(labels=LABELS, alpha=0.5),
    "k_labels": dict(labels=LABELS, labels_per_client=2),
    "fedit_epsilon": dict(categories=CATEGORIES, epsilon=0.5),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_covers_input_disjointly_and_is_deterministic(scheme):
    indices = list(range(NUM_ROWS))
    first = partition(scheme, indices, 10, seed=7, **SCHEMES[scheme])
    assert len(first) == 10
    assert_exact_cover(first, indices)
    assert partition(scheme, indices, 10, seed=7, **SCHEMES[scheme]) == first
    assert partition(scheme, indices, 10, seed=8, **SCHEMES[scheme]) != first


def test_partitioners_work_on_a_subset_with_aligned_labels():
    public, remaining = split_public(NUM_ROWS, fraction=0.1, seed=0)
    labels = [LABELS[index] for index in remaining]
    clients = partition_dirichlet(remaining, labels, 5, alpha=1.0, seed=0)
    assert_exact_cover(clients, remaining)
    assert not set(public) & {index for client in clients for index in client}
    for client in clients:  # labels stay attached to their rows
        assert all(LABELS[index] == index % 4 for index in client)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(client) for client in partition_iid(range(103), 10, seed=0)]
    assert sum(sizes) == 103 and max(sizes) - min(sizes) <= 1


def label_shares(clients):
    """Per client: fraction of its rows in its most common label."""
    return [max(Counter(LABELS[i] for i in client).values()) / len(client) for client in clients]


def test_dirichlet_huge_alpha_is_near_iid_and_tiny_alpha_is_skewed():
    indices = list(range(NUM_ROWS))
    near_iid = partition_dirichlet(indices, LABELS, 10, alpha=1e4, seed=0)
    skewed = partition_dirichlet(indices, LABELS, 10, alpha=0.05, seed=0)
    assert_exact_cover(near_iid, indices)
    assert_exact_cover(skewed, indices)
    # 4 balanced classes: an IID client has ~25% of its rows in its top class
    assert max(label_shares(near_iid)) < 0.30
    assert np.mean(label_shares(skewed)) > 0.8
    near_iid_sizes = [len(client) for client in near_iid]
    assert max(near_iid_sizes) - min(near_iid_sizes) < 0.1 * NUM_ROWS / 10


def test_dirichlet_min_size_is_respected():
    clients = partition_dirichlet(range(NUM_ROWS), LABELS, 10, alpha=0.3, seed=3, min_size=100)
    assert min(len(client) for client in clients) >= 100


def test_fedit_epsilon_smaller_epsilon_concentrates_categories():
    indices = list(range(NUM_ROWS))

    def categories_per_client(epsilon):
        clients = partition_fedit_epsilon(indices, CATEGORIES, 10, epsilon=epsilon, seed=1)
        assert_exact_cover(clients, indices)
        # categories holding at least 5% of the client's rows
        return np.mean(
            [sum(count >= 0.05 * len(c) for count in Counter(CATEGORIES[i] for i in c).values()) for c in clients]
        )

    assert categories_per_client(0.05) < 3 < 7.5 < categories_per_client(1e4)


@pytest.mark.parametrize("seed", range(5))
def test_clients_at_the_mean_size_get_no_further_groups(seed):
    # Shepherd / NIID-Bench cap: a client holding >= N/K rows gets no share of later categories, so no
    # client can exceed N/K plus one whole category (500 rows here), whatever epsilon does
    clients = partition_fedit_epsilon(range(NUM_ROWS), CATEGORIES, 10, epsilon=0.05, seed=seed)
    assert max(len(client) for client in clients) < NUM_ROWS / 10 + NUM_ROWS / 8


def test_fedit_epsilon_accepts_shepherds_min_size_on_dolly_sized_data():
    categories = [f"c{i % 8}" for i in range(14931)]
    clients = partition_fedit_epsilon(range(14931), categories, 10, epsilon=0.5, seed=0, min_size=40)
    assert min(len(client) for client in clients) >= 40


@pytest.mark.parametrize("num_clients, expected_holders", [(10, 5), (6, 3), (3, 2)])
def test_k_labels_gives_exactly_k_labels_and_spreads_holders_evenly(num_clients, expected_holders):
    clients = partition_k_labels(range(NUM_ROWS), LABELS, num_clients, labels_per_client=2, seed=0)
    assert_exact_cover(clients, list(range(NUM_ROWS)))
    label_sets = [{LABELS[i] for i in client} for client in clients]
    assert all(len(labels) == 2 for labels in label_sets)
    holders = Counter(label for labels in label_sets for label in labels)
    assert max(holders.values()) - min(holders.values()) <= 1
    assert max(holders.values()) == expected_holders


def test_k_labels_splits_a_label_evenly_among_its_holders():
    clients = partition_k_labels(range(NUM_ROWS), LABELS, 10, labels_per_client=2, seed=0)
    rows_of_label_0 = [sum(LABELS[i] == 0 for i in client) for client in clients]
    holders = [count for count in rows_of_label_0 if count]
    assert len(holders) == 5 and max(holders) - min(holders) <= 1 and sum(holders) == 1000


def test_split_public_is_disjoint_and_sized():
    public, remaining = split_public(1000, fraction=0.05, seed=0)
    assert len(public) == 50 and len(remaining) == 950
    assert sorted(public + remaining) == list(range(1000)) and public == sorted(public)
    assert split_public(1000, size=7, seed=0)[0] == split_public(1000, size=7, seed=0)[0]
    assert len(split_public(1000, size=7, seed=0)[0]) == 7
    assert split_public(10, seed=0) == ([], list(range(10)))


def test_presplit_is_restricted_to_remaining_rows():
    presplit = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    assert partition("presplit", [0, 2, 3, 5, 6], 3, seed=0, presplit_clients=presplit) == [[0, 2], [3], [5, 6]]


# ---------------------------------------------------------------------------------------------------
# errors


def test_zero_clients_is_an_error():
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        partition_iid(range(10), 0, seed=0)


def test_more_clients_than_rows_names_both_counts():
    with pytest.raises(ValueError, match=r"each of 11 clients.*only 10 rows"):
        partition_iid(range(10), 11, seed=0)


def test_too_many_labels_per_client():
    with pytest.raises(ValueError, match="labels_per_client=5 but the data has 4 distinct labels"):
        partition_k_labels(range(NUM_ROWS), LABELS, 10, labels_per_client=5, seed=0)


def test_k_labels_that_would_drop_rows_is_refused():
    with pytest.raises(ValueError, match="cover only 2 of 4 labels"):
        partition_k_labels(range(NUM_ROWS), LABELS, 2, labels_per_client=1, seed=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_or_epsilon(alpha):
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(range(NUM_ROWS), LABELS, 10, alpha=alpha, seed=0)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        partition_fedit_epsilon(range(NUM_ROWS), CATEGORIES, 10, epsilon=alpha, seed=0)


def test_dirichlet_that_cannot_fill_every_client_suggests_a_fix():
    # 2 classes, 40 clients, tiny alpha: each class lands on ~1 client, so most clients stay empty
    few_rows = list(range(80))
    with pytest.raises(ValueError, match=r"40 clients, 80 rows\). Use a larger alpha, fewer clients"):
        partition_dirichlet(few_rows, [i % 2 for i in few_rows], 40, alpha=1e-3, seed=0, min_size=2)


def test_impossible_min_size_is_refused_up_front():
    with pytest.raises(ValueError, match="min_size=500 is impossible for 10 clients over 4000 rows"):
        partition_dirichlet(range(NUM_ROWS), LABELS, 10, alpha=1.0, seed=0, min_size=500)


def test_labels_must_align_with_indices():
    with pytest.raises(ValueError, match="got 10 indices but 4000"):
        partition_dirichlet(range(10), LABELS, 2, alpha=1.0, seed=0)


def test_public_set_cannot_take_everything():
    with pytest.raises(ValueError, match="leave none for the clients"):
        split_public(10, size=10, seed=0)
    with pytest.raises(ValueError, match="0 <= fraction < 1"):
        split_public(10, fraction=1.5, seed=0)


def test_presplit_client_count_and_emptied_clients():
    with pytest.raises(ValueError, match="ships a split for 2 clients but num_clients=3"):
        partition_presplit(range(4), 3, presplit_clients=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"client\(s\) \[1\]"):
        partition_presplit([0, 1], 2, presplit_clients=[[0, 1], [2, 3]])


def test_unknown_scheme_and_missing_arguments():
    with pytest.raises(ValueError) as error:
        partition("shards", range(10), 2, seed=0)
    assert all(name in str(error.value) for name in PARTITION_SCHEMES)
    with pytest.raises(ValueError, match="needs labels=, alpha="):
        partition("dirichlet", range(10), 2, seed=0)
