"""docs/scripts/sampling_ceiling.py: the perfect drafter's best tree (a dynamic programme) against
every tree, enumerated."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "scripts" / "sampling_ceiling.py"


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("sampling_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_tree_by_enumeration(gains: list[float], nodes: int) -> float:
    """Expected accepted drafted tokens of the best tree of ``nodes`` nodes, found by growing every tree
    node by node. A node is the path of its candidates' ranks, depth by depth; it may join when its
    parent has (or it is at depth 1) and its next-better sibling has; it counts the product of its
    path's gains."""
    trees = {frozenset()}
    for _ in range(nodes):
        grown = set()
        for tree in trees:
            for parent in [()] + list(tree):
                for rank in range(len(gains)):
                    node = parent + (rank,)
                    if node not in tree and (rank == 0 or parent + (rank - 1,) in tree):
                        grown.add(tree | {node})
        trees = grown
    best = 0.0
    for tree in trees:
        value = 0.0
        for path in tree:
            reach = 1.0
            for rank in path:
                reach *= gains[rank]
            value += reach
        best = max(best, value)
    return best


def test_perfect_trees_match_enumeration(ceiling):
    top_n = {1: 0.48, 2: 0.59, 3: 0.64, 4: 0.68}  # p(top-n of p), as measured at T = 1.0
    gains = [0.48, 0.11, 0.05, 0.04]
    flat = {d: 1.0 for d in range(1, ceiling.CHAIN_DEPTH + 1)}  # no correlation correction
    chain = {"tau_exact": flat, "tau_if_independent": flat}
    verify_ms = {1: 2.0, 2: 2.5, 4: 3.0, 8: 5.0}
    trees = ceiling.perfect_trees(top_n, chain, verify_ms)
    for nodes in (1, 2, 3, 4, 5):
        expected = 1 + best_tree_by_enumeration(gains, nodes)
        assert trees[nodes]["tau"] == pytest.approx(expected, abs=1e-3)
    # verify cost interpolated between measured sizes; x plain = tau * verify(1) / verify(K + 1)
    assert trees[2]["verify_ms"] == pytest.approx(2.5 + 0.5 * 1 / 2)
    assert trees[2]["x_plain"] == pytest.approx(trees[2]["tau"] * 2.0 / 2.75, abs=2e-3)
    assert 8 not in trees  # 9 tree tokens are past the measured curve


def test_perfect_trees_scale_by_the_chain_correlation(ceiling):
    top_n = {1: 0.5, 2: 0.6}
    independent = {d: 1.0 for d in range(1, ceiling.CHAIN_DEPTH + 1)}
    exact = {d: 1.0 + 0.1 * d for d in independent}
    plain = ceiling.perfect_trees(top_n, {"tau_exact": independent, "tau_if_independent": independent}, {1: 1, 8: 1})
    raised = ceiling.perfect_trees(top_n, {"tau_exact": exact, "tau_if_independent": independent}, {1: 1, 8: 1})
    for nodes in (1, 3, 7):
        assert raised[nodes]["tau"] == pytest.approx(plain[nodes]["tau"] * (1 + 0.1 * nodes), abs=2e-3)
