"""SparsePatternConfig's derived numbers and fields where rounding matters (docs/semantics.md section 3).

The layout tests compare ``layout_mask`` with tests/brute_force.py, which reads the same config
fields: a derived number that is wrong in a way no integer comparison notices (a radius of 3.125
blocks instead of 3), or a stride that only differs where round(1 / ratio) is 1, passes there. These
tests state each number from docs/semantics.md section 3 with values that do not divide (found by
``make mutation``, experiments/mutation.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reference import SparsePatternConfig, layout_mask


@pytest.mark.parametrize(
    "window, block, tokens, radius, global_blocks",
    [
        (100, 16, 33, 3, 3),  # 100 / 32 = 3.125 blocks each side; 33 tokens reach into a third block
        (7, 2, 5, 1, 3),
        (3, 2, 1, 0, 1),  # a window narrower than two blocks keeps the diagonal only
        (64, 16, 32, 2, 2),  # the round case: exact quotients
        (0, 1, 0, 0, 0),
    ],
)
def test_radius_is_the_floor_and_global_blocks_the_ceiling(window, block, tokens, radius, global_blocks):
    """radius = local_window_size // (2 b), ng = ceil(global_tokens / b): whole blocks, as ints."""
    config = SparsePatternConfig(
        pattern_type="global_local", block_size=block, local_window_size=window, global_tokens=tokens
    )
    assert config.local_radius_blocks == radius and type(config.local_radius_blocks) is int
    assert config.global_blocks == global_blocks and type(config.global_blocks) is int


@pytest.mark.parametrize(
    "ratio, stride",
    [(1.0, 1), (0.9, 1), (0.7, 1), (0.6, 2), (0.45, 2), (0.3, 3), (0.26, 4), (0.1, 10), (0.01, 100)],
)
def test_dilated_stride_rounds_one_over_the_ratio(ratio, stride):
    """s = max(1, round(1 / sparsity_ratio)): above a ratio of 2/3 every block diagonal is kept."""
    config = SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=ratio, block_size=2)
    assert config.dilated_stride == stride and type(config.dilated_stride) is int
    mask = layout_mask(config, 7)
    qb, kb = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(mask, (qb - kb) % stride == 0)
    if stride == 1:
        assert mask.all()


def test_the_defaults_are_the_seeds():
    """SparsePatternConfig() with no arguments: the seed project's settings (docs/semantics.md section 8's example)."""
    config = SparsePatternConfig()
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert fields == dict(
        pattern_type="dilated_sparse",
        sparsity_ratio=0.1,
        block_size=128,
        local_window_size=512,
        global_tokens=128,
        seed=0,
        block_layout=None,
        layout_fingerprint=None,
    )


def _custom(values) -> SparsePatternConfig:
    return SparsePatternConfig(pattern_type="custom", block_size=2, block_layout=torch.tensor(values, dtype=torch.bool))


def test_custom_configs_compare_and_hash_by_their_fingerprint():
    """Equal layouts in distinct tensors: equal configs with one hash (caches and ring ranks key on it)."""
    first, twin = _custom([[True, False], [True, True]]), _custom([[True, False], [True, True]])
    other = _custom([[True, True], [True, True]])
    assert first.block_layout is not twin.block_layout
    assert first == twin and hash(first) == hash(twin)
    assert first.layout_fingerprint == twin.layout_fingerprint
    assert first.layout_fingerprint.startswith("2:")
    assert first != other and first.layout_fingerprint != other.layout_fingerprint
    assert len({first, twin, other}) == 2


def test_the_repr_names_the_fingerprint_not_the_tensor():
    config = _custom([[True, False], [False, True]])
    text = repr(config)
    assert config.layout_fingerprint in text
    assert "tensor(" not in text and "block_layout" not in text


def test_the_fingerprint_is_computed_never_given():
    with pytest.raises(TypeError, match="layout_fingerprint"):
        SparsePatternConfig(pattern_type="dense", layout_fingerprint="2:abc")
