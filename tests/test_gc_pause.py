"""The garbage-collector freeze around the load."""

from __future__ import annotations

import gc

from runner.gc_pause import setup_objects_frozen


def test_frozen_inside_block_only():
    before = gc.get_freeze_count()
    live_objects = [object() for _ in range(10)]

    with setup_objects_frozen():
        inside = gc.get_freeze_count()

    assert before == 0
    assert inside >= len(live_objects)
    assert gc.get_freeze_count() == 0


def test_unfrozen_after_error():
    try:
        with setup_objects_frozen():
            raise RuntimeError("load failed")
    except RuntimeError:
        pass

    assert gc.get_freeze_count() == 0
