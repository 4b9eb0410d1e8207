import json

import psutil
import pytest

from rbee.errors import RbeeError
from rbee_hive.nvml import CudaProbe
from rbee_hive.resources import OverriddenResources, SystemResources, existing_ancestor

MB = 1024 * 1024


class NoGpu:
    def probe(self):
        return CudaProbe(False, detail="no driver")


def test_system_figures_match_psutil(tmp_path):
    res = SystemResources(NoGpu()).snapshot(tmp_path / "models" / "not-yet")
    mem = psutil.virtual_memory()
    assert res.ram_total_bytes == mem.total
    # available moves all the time on a shared machine: same order of magnitude
    assert 0 < res.ram_available_bytes <= res.ram_total_bytes
    assert res.disk_path == str(tmp_path)
    disk = psutil.disk_usage(str(tmp_path))
    assert res.disk_total_bytes == disk.total
    assert res.gpus == ()
    assert not res.overridden


def test_existing_ancestor(tmp_path):
    assert existing_ancestor(tmp_path / "a" / "b") == tmp_path


def test_override_file_pins_some_figures_and_is_reread(tmp_path):
    path = tmp_path / "figures.json"
    path.write_text(json.dumps({"ram_available_bytes": 100 * MB}))
    src = OverriddenResources(path, SystemResources(NoGpu()))
    res = src.snapshot(tmp_path)
    assert res.ram_available_bytes == 100 * MB
    assert res.ram_total_bytes == psutil.virtual_memory().total  # not pinned: real
    assert res.overridden
    path.write_text(json.dumps({"disk_available_bytes": 5 * MB, "gpus": [{"vram_total_bytes": 8 * MB, "vram_available_bytes": 2 * MB}]}))
    res = src.snapshot(tmp_path)
    assert res.disk_available_bytes == 5 * MB and res.ram_available_bytes != 100 * MB
    assert res.gpus[0].index == 0 and res.gpus[0].vram_available_bytes == 2 * MB
    assert src.cuda().available and len(src.cuda().gpus) == 1


def test_override_without_gpus_key_keeps_the_real_probe_and_empty_pins_none(tmp_path):
    path = tmp_path / "figures.json"
    path.write_text("{}")
    assert OverriddenResources(path, SystemResources(NoGpu())).cuda().detail == "no driver"
    path.write_text('{"gpus": []}')
    assert not OverriddenResources(path, SystemResources(NoGpu())).cuda().available


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "not found"), ("{nope", "Cannot read"), ('{"ram_total_bytes": "lots"}', "whole number"), ('{"gpus": [{}]}', "gpus")],
)
def test_bad_override_files_are_clear_errors(tmp_path, content, fragment):
    path = tmp_path / "figures.json"
    if content is not None:
        path.write_text(content)
    src = OverriddenResources(path, SystemResources(NoGpu()))
    with pytest.raises(RbeeError) as exc:
        src.snapshot(tmp_path)
        src.cuda()
    assert exc.value.code == "INVALID_ARGUMENT" and fragment in exc.value.message
