"""gpunn.kernels.linear.plan: the tile and reduction split of a product, from its shape and SM count.

A pure function, so it is tested directly (no kernel runs here).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunn._cuda import cuda_status

pytestmark = pytest.mark.skipif(not cuda_status().usable, reason=f"gpunn.kernels unavailable: {cuda_status().reason}")

if cuda_status().usable:
    from gpunn.kernels.linear import SPLIT_BLOCKS_PER_SM, SPLIT_MIN_SLICES, TILES, plan

H200_SMS = 132


def blocks(p, rows, cols):
    return -(-rows // p.tile.bm) * -(-cols // p.tile.bn)


def test_large_square_product_uses_the_largest_tile_unsplit():
    p = plan(4096, 4096, 4096, H200_SMS, splittable=True)
    assert p.tile.name == "128x128" and p.splits == 1


def test_narrow_layer_does_not_pay_for_a_wider_tile():
    # 64 output columns: a 128-wide tile would compute half zeros
    assert plan(65536, 64, 64, H200_SMS, splittable=False).tile.name == "64x64"


def test_small_batch_spreads_over_more_blocks_than_the_largest_tile():
    p = plan(128, 256, 256, H200_SMS, splittable=False)
    assert blocks(p, 128, 256) > blocks(plan(128, 256, 256, H200_SMS, False, tile="128x128"), 128, 256)


def test_weight_gradient_of_a_small_layer_splits_the_batch_to_fill_every_sm():
    # dw = x.T @ g for a 256 -> 256 layer at batch 8192: 4 output tiles at most
    p = plan(256, 256, 8192, H200_SMS, splittable=True)
    assert blocks(p, 256, 256) * p.splits >= H200_SMS


def test_forward_never_splits():
    assert plan(64, 64, 1 << 20, H200_SMS, splittable=False).splits == 1


def test_float64_has_its_own_tiles():
    p = plan(4096, 4096, 4096, H200_SMS, splittable=False, dtype=np.float64)
    assert p.tile in TILES[np.dtype(np.float64)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sm_count"):
        plan(10, 10, 10, 0, splittable=True)
    with pytest.raises(ValueError, match="tile"):
        plan(10, 10, 10, 4, splittable=True, tile="128x128", dtype=np.float64)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 1 << 17),
    cols=st.integers(1, 1 << 12),
    red=st.integers(0, 1 << 17),
    sms=st.integers(1, 256),
    splittable=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_plan_invariants(rows, cols, red, sms, splittable, dtype):
    p = plan(rows, cols, red, sms, splittable, dtype)
    assert p == plan(rows, cols, red, sms, splittable, dtype)  # pure
    slices = max(1, -(-red // p.tile.bk))
    # the splits cover every slice, and none is empty
    assert p.splits * p.slices_per_split >= slices > (p.splits - 1) * p.slices_per_split
    if not splittable:
        assert p.splits == 1
    if p.splits > 1:
        assert p.slices_per_split >= SPLIT_MIN_SLICES
        # no more splits than it takes to reach the target grid
        assert blocks(p, rows, cols) * (p.splits - 1) < SPLIT_BLOCKS_PER_SM * sms
