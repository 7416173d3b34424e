"""The migration planner's tables: freeness, where a request may go, and which move the rebalancer makes."""

from __future__ import annotations

import pytest

from pdserve.controller.planner import KVLoad, pick_target, plan_rebalance


@pytest.mark.parametrize(
    "load, freeness",
    [
        (KVLoad("w", 100, 4), 25.0),
        (KVLoad("w", 100, 0), 100.0),  # idle: all its free blocks
        (KVLoad("w", 100, 4, queued_blocks=60), 10.0),  # queued prompts count as used
        (KVLoad("w", 10, 2, queued_blocks=30), -10.0),  # over-committed
    ],
)
def test_freeness(load, freeness):
    assert load.freeness() == freeness


@pytest.mark.parametrize(
    "loads, blocks, target",
    [
        ([KVLoad("a", 50, 5), KVLoad("b", 200, 2), KVLoad("c", 300, 10)], 20, "b"),  # most free per request
        ([KVLoad("a", 50, 5), KVLoad("b", 21, 0)], 20, "a"),  # b is freer but too small with the margin
        ([KVLoad("src", 500, 0), KVLoad("a", 5, 1)], 20, None),  # never the source; nobody else has room
        ([KVLoad("a", 100, 1, queued_blocks=90), KVLoad("b", 40, 1)], 20, "b"),  # queued demand counts
    ],
)
def test_pick_target(loads, blocks, target):
    assert pick_target(loads, "src", blocks) == target


@pytest.mark.parametrize(
    "loads, candidates, move",
    [
        # a pile-up on a, an empty b: the cheapest request that narrows the gap moves
        ([KVLoad("a", 40, 8), KVLoad("b", 400, 0)], {"a": [("r1", 50), ("r2", 30), ("r3", 45)]}, ("r2", "a", "b")),
        # under the threshold (8): nothing moves
        ([KVLoad("a", 100, 4), KVLoad("b", 130, 4)], {"a": [("r1", 10)]}, None),
        # one request alone: moving it would just swap the gap (no ping-pong)
        ([KVLoad("a", 90, 1), KVLoad("b", 100, 0)], {"a": [("r1", 10)]}, None),
        # the target has no room for any candidate
        ([KVLoad("a", 0, 6), KVLoad("b", 12, 0)], {"a": [("r1", 40), ("r2", 30)]}, None),
        # a single worker: nothing to balance
        ([KVLoad("a", 0, 6)], {"a": [("r1", 40)]}, None),
    ],
)
def test_plan_rebalance(loads, candidates, move):
    assert plan_rebalance(loads, candidates, threshold=8.0) == move
