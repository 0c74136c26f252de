"""optimized/plan.py: a CallPlan is frozen, and its hash (computed once, since the kernels' table caches hash
plans at every call) is that of its fields: equal plans hash alike, and a plan is never changed after its hash
was taken. ``make mutation`` (experiments/mutation.py) found the frozen flag unpinned once the hash was cached.
"""

from __future__ import annotations

import dataclasses

import pytest

from optimized.plan import CallPlan, StepPair
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig


def _plan(scale=0.5, query_range=(0, 32)):
    geometry = AttentionGeometry(DilationConfig((16, 32), (1, 2)), 32, 2)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    return CallPlan(geometry, config, True, scale, query_range, (0, 32))


def test_call_plans_and_step_pairs_are_frozen():
    plan = _plan()
    hash(plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.scale = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        StepPair(plan, 0, 0).query_shift = 3


def test_equal_plans_hash_alike_and_any_field_tells_plans_apart():
    plan, same = _plan(), _plan()
    assert plan is not same and plan == same and hash(plan) == hash(same)
    assert hash(plan) == hash((plan.geometry, plan.sparse_config, True, 0.5, (0, 32), (0, 32)))
    for other in (_plan(scale=0.25), _plan(query_range=(16, 32))):
        assert other != plan and hash(other) != hash(plan)
    assert len({plan, same, _plan(scale=0.25)}) == 2
