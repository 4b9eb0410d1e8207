"""The hive's core assignment: disjoint where there are enough cores, shared and said why otherwise."""

from __future__ import annotations

from rbee_hive.workers.cores import CoreAssigner


def test_fixed_share_gives_disjoint_cores_then_shares_the_least_used():
    cores = CoreAssigner(range(4), per_worker=2)
    a, b = cores.assign("worker-a"), cores.assign("worker-b")
    assert (a.cores, b.cores, a.exclusive, b.exclusive) == ((0, 1), (2, 3), True, True)
    c = cores.assign("worker-c")
    assert not c.exclusive and len(c.cores) == 2
    assert "shared with worker-a" in c.note and "worker_cores" in c.note
    cores.release("worker-a")
    cores.release("worker-c")
    again = cores.assign("worker-d")
    assert (again.cores, again.exclusive) == ((0, 1), True)


def test_auto_gives_every_free_core_and_says_why_a_second_shares():
    cores = CoreAssigner([0, 1], per_worker=0)
    first = cores.assign("worker-a")
    assert (first.cores, first.exclusive) == ((0, 1), True)
    second = cores.assign("worker-b")
    assert second.cores == (0, 1) and not second.exclusive
    assert "only 0 of the hive's 2 cores are free" in second.note


def test_assigning_again_replaces_the_workers_own_cores():
    cores = CoreAssigner([0, 1], per_worker=1)
    assert cores.assign("worker-a").cores == (0,)
    assert cores.assign("worker-a").cores == (0,)  # a retried launch keeps its core
    assert cores.assign("worker-b").cores == (1,)


def test_more_wanted_than_the_hive_has_is_capped():
    cores = CoreAssigner([3], per_worker=8)
    assert cores.assign("worker-a").cores == (3,)


def test_hive_settings_worker_dtype_and_cores(tmp_path, monkeypatch):
    import pytest

    from rbee.errors import RbeeError
    from rbee_hive.settings import load_settings

    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "config.toml"))
    settings = load_settings(worker_dtype="BF16", worker_cores=2)
    assert (settings.worker_dtype, settings.worker_cores) == ("bfloat16", 2)
    assert load_settings().worker_dtype == "auto"
    for bad in ({"worker_dtype": "int3"}, {"worker_cores": -1}):
        with pytest.raises(RbeeError) as exc:
            load_settings(**bad)
        assert exc.value.code == "INVALID_ARGUMENT" and next(iter(bad)) in exc.value.message
