"""The hive preflight's floor (rbee_queen/hive_minimums.py): which backend's
figures apply, both sides of each boundary, sizes with units in settings.
Through real processes: tests/integration/test_hive_minimums.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rbee.errors import RbeeError
from rbee_queen.hive_minimums import GiB, check_minimums, parse_size
from rbee_queen.settings import load_settings


def figures(ram: int, disk: int) -> SimpleNamespace:
    return SimpleNamespace(ram_available_bytes=ram, disk_available_bytes=disk, disk_path="/models")


class Checks(list):
    def __call__(self, name: str, passed: bool, message: str, warning: bool = False, **details: object) -> None:
        self.append((passed, warning, message))


@pytest.fixture
def settings(monkeypatch, tmp_path):
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "empty.toml"))
    return load_settings(home=tmp_path)


def test_defaults_and_sizes_with_units(settings, monkeypatch) -> None:
    assert (settings.hive_min_ram_gpu, settings.hive_min_disk_gpu) == (8 * GiB, 50 * GiB)
    assert (settings.hive_min_ram_cpu, settings.hive_min_disk_cpu) == (3 * GiB, 5 * GiB)
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("2 GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 * GiB // 2
    monkeypatch.setenv("RBEE_QUEEN_HIVE_MIN_DISK_CPU", "0")
    assert load_settings(home=settings.home).hive_min_disk_cpu == 0
    monkeypatch.setenv("RBEE_QUEEN_HIVE_MIN_RAM_CPU", "lots")
    with pytest.raises(RbeeError) as err:
        load_settings(home=settings.home)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.details["setting"] == "hive_min_ram_cpu"


def test_a_task_needs_its_own_backends_floor(settings) -> None:
    checks = Checks()
    check_minimums(settings, "n", figures(3 * GiB, 5 * GiB), ["cpu", "cuda"], "cpu", checks)
    assert checks == [(True, False, "Free RAM and disk above the minimum (cpu: 3.0 GiB RAM, 5.0 GiB disk)")]
    with pytest.raises(RbeeError) as err:
        check_minimums(settings, "n", figures(8 * GiB - 1, 60 * GiB), ["cpu", "cuda"], "cuda", checks)
    assert err.value.code == "INSUFFICIENT_RAM"
    assert err.value.details["ram_required_mb"] == "8192" and err.value.details["backend"] == "cuda"
    assert any("hive_min_ram_gpu" in s for s in err.value.suggestions)
    with pytest.raises(RbeeError) as err:
        check_minimums(settings, "n", figures(8 * GiB, 50 * GiB - 1), ["cpu", "cuda"], "cuda", checks)
    assert err.value.code == "INSUFFICIENT_DISK" and "rbee-keeper models rm MODEL --node n" in err.value.suggestions[0]
    check_minimums(settings, "n", figures(8 * GiB, 50 * GiB), ["cpu", "cuda"], "cuda", checks)


def test_without_a_backend_one_met_floor_is_enough(settings) -> None:
    checks = Checks()
    check_minimums(settings, "n", figures(4 * GiB, 60 * GiB), ["cpu", "cuda"], None, checks)
    assert (True, True, "Node n is below the minimum for cuda workers (4.0 GiB of RAM free, needs 8.0 GiB)") in checks
    with pytest.raises(RbeeError) as err:
        check_minimums(settings, "n", figures(2 * GiB, 60 * GiB), ["cpu", "cuda"], None, Checks())
    # The refusal names the lowest floor (the CPU one), the easiest to reach.
    assert err.value.code == "INSUFFICIENT_RAM" and err.value.details["backend"] == "cpu"
