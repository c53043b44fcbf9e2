from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.scheduler.block_manager import BlockManager, HostBlockManager


def test_allocate_and_free_track_usage():
    manager = BlockManager(num_blocks=8, block_size=16)
    assert manager.num_free == 8 and manager.usage == 0.0
    first = manager.allocate(3)
    second = manager.allocate(5)
    assert sorted(first + second) == list(range(8))
    assert manager.num_free == 0 and manager.usage == 1.0
    assert not manager.can_allocate(1) and manager.can_allocate(0)
    manager.free(first)
    assert manager.num_free == 3 and manager.usage == pytest.approx(5 / 8)
    assert all(manager.ref_count(block_id) == 0 for block_id in first)
    assert all(manager.ref_count(block_id) == 1 for block_id in second)


def test_allocating_more_than_free_raises():
    manager = BlockManager(num_blocks=4, block_size=16)
    manager.allocate(3)
    assert not manager.can_allocate(2)
    with pytest.raises(RuntimeError, match="only 1 free"):
        manager.allocate(2)
    assert manager.num_free == 1  # a failed allocate takes nothing


def test_freed_blocks_are_reused_last():
    manager = BlockManager(num_blocks=4, block_size=16)
    blocks = manager.allocate(2)
    manager.free(reversed(blocks))
    # The two never-used blocks come first, then the freed ones, tail first.
    assert manager.allocate(4) == [2, 3, blocks[1], blocks[0]]


def test_double_free_and_foreign_ids_are_rejected():
    manager = BlockManager(num_blocks=4, block_size=16)
    [block_id] = manager.allocate(1)
    manager.free([block_id])
    with pytest.raises(ValueError, match="double free"):
        manager.free([block_id])
    with pytest.raises(ValueError, match="not in this pool"):
        manager.free([4])
    with pytest.raises(ValueError, match="not in this pool"):
        manager.free([-1])


def test_shared_blocks_are_freed_with_their_last_reference():
    manager = BlockManager(num_blocks=4, block_size=16)
    blocks = manager.allocate(2)
    manager.add_ref(blocks)
    assert [manager.ref_count(block_id) for block_id in blocks] == [2, 2]
    manager.free(blocks)
    assert manager.num_free == 2
    manager.free(blocks)
    assert manager.num_free == 4
    with pytest.raises(ValueError, match="is free"):
        manager.add_ref([blocks[0]])


def test_a_pool_can_own_an_id_range_after_the_device_tier():
    pool = BlockManager(num_blocks=3, block_size=16, first_block_id=10)
    blocks = pool.allocate(3)
    assert blocks == [10, 11, 12]
    with pytest.raises(ValueError, match="not in this pool"):
        pool.free([0])
    pool.free(blocks)
    assert pool.num_free == 3


# ---------------------------------------------------------------- the host tier


def test_host_blocks_come_from_the_lowest_ids_inside_the_lease():
    # The host tier takes ids [D, D + H) (DESIGN.md "Block ids"); here D = 10.
    host = HostBlockManager(num_blocks=8, block_size=16, first_block_id=10)
    assert host.num_free == 0 and not host.can_allocate(1) and host.usage == 0.0
    host.set_lease(4)
    assert host.allocate(3) == [10, 11, 12]
    host.free([11])
    assert host.allocate(2) == [11, 13]  # the lowest free first: used blocks stay packed
    assert not host.can_allocate(1) and host.usage == 1.0
    with pytest.raises(RuntimeError, match="only 0 free"):
        host.allocate(1)
    host.set_lease(8)
    assert host.num_free == 4 and host.usage == 0.5


def test_a_lease_shrink_below_used_blocks_counts_them_until_freed():
    host = HostBlockManager(num_blocks=8, block_size=16, first_block_id=10)
    host.set_lease(6)
    blocks = host.allocate(5)
    host.free([10, 11])
    host.set_lease(3)  # 12 is inside, 13 and 14 above
    assert host.num_used == 3 and host.num_used_above_lease == 2
    assert host.block_ids_above_lease() == [13, 14]
    assert host.num_free == 2 and host.allocate(2) == [10, 11]  # never above the lease
    assert host.is_above_lease(13) and not host.is_above_lease(12)
    assert host.usage == 1.0
    host.free([13, 14])
    assert host.num_used_above_lease == 0 and host.num_free == 0
    host.free([10, 11, blocks[2]])
    assert host.num_used == 0 and host.num_free == 3


def test_host_lease_and_ids_are_checked():
    host = HostBlockManager(num_blocks=2, block_size=16, first_block_id=4)
    with pytest.raises(ValueError, match="host lease"):
        host.set_lease(3)
    with pytest.raises(ValueError, match="host lease"):
        host.set_lease(-1)
    host.set_lease(2)
    [block_id] = host.allocate(1)
    host.free([block_id])
    with pytest.raises(ValueError, match="double free"):
        host.free([block_id])
    with pytest.raises(ValueError, match="not in the host pool"):
        host.free([3])
    empty = HostBlockManager(num_blocks=0, block_size=16, first_block_id=4)  # policy none: no host tier
    empty.set_lease(0)
    assert empty.num_free == 0 and empty.usage == 0.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["allocate", "free", "lease"]), st.integers(0, 12)), max_size=60))
def test_random_host_operations_keep_the_lease_and_the_counts(operations):
    host = HostBlockManager(num_blocks=12, block_size=4, first_block_id=100)
    held: list[int] = []
    for operation, amount in operations:
        if operation == "allocate":
            if host.can_allocate(amount):
                blocks = host.allocate(amount)
                assert all(100 <= block_id < 100 + host.lease for block_id in blocks)
                free_below = [b for b in range(100, 100 + host.lease) if b not in held and b not in blocks]
                assert not free_below or min(free_below) > max(blocks, default=99)  # the lowest first
                held += blocks
        elif operation == "free" and held:
            host.free([held.pop(amount % len(held))])
        elif operation == "lease":
            host.set_lease(amount)
        above = sorted(block_id for block_id in held if block_id >= 100 + host.lease)
        assert host.num_used == len(held) and host.num_used_above_lease == len(above)
        assert host.block_ids_above_lease() == above
        assert host.num_free == host.lease - (len(held) - len(above))
        assert all(host.is_used(block_id) == (block_id in held) for block_id in range(100, 112))
        assert host.high_water == (max(held) - 100 + 1 if held else 0)


def test_num_blocks_for_rounds_up():
    manager = BlockManager(num_blocks=4, block_size=16)
    assert [manager.num_blocks_for(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_an_empty_pool_is_rejected():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=60))
def test_random_allocate_free_keeps_the_pool_consistent(operations):
    manager = BlockManager(num_blocks=12, block_size=4)
    held: list[list[int]] = []
    for is_allocate, amount in operations:
        if is_allocate:
            if manager.can_allocate(amount):
                held.append(manager.allocate(amount))
        elif held:
            manager.free(held.pop(amount % len(held)))
        in_use = [block_id for blocks in held for block_id in blocks]
        assert len(in_use) == len(set(in_use)) == manager.num_used
        assert manager.num_free + manager.num_used == 12
        assert all(manager.ref_count(block_id) == (block_id in in_use) for block_id in range(12))
