"""Which paths a worker's Landlock policy opens (rbee_hive/workers/sandbox.py):
everything but the closed paths, exceptions inside them, links never leading
back in."""

from __future__ import annotations

import os
from pathlib import Path

from rbee_hive.workers.sandbox import open_paths


def test_everything_but_the_hives_home_with_its_models_open_again(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for d in (home / "tls", home / "models" / "m", tmp_path / "other"):
        d.mkdir(parents=True)
    (home / "hive.key").write_text("k")
    os.symlink(home, tmp_path / "link-to-home")  # a way back in
    os.symlink(tmp_path, tmp_path / "other" / "link-above")  # a way above it
    os.symlink(tmp_path / "other", tmp_path / "link-to-other")
    opened = open_paths([home], [home / "models", tmp_path])  # an allowed folder above the home is carved
    inside = {p for p in opened if p == tmp_path or tmp_path in p.parents}
    assert home / "models" in inside and tmp_path / "other" in inside and tmp_path / "link-to-other" in inside
    assert tmp_path not in inside and home not in inside and home / "tls" not in inside and home / "hive.key" not in inside
    assert tmp_path / "link-to-home" not in inside
    # Nothing opened leads into the home but the models.
    for path in inside:
        real = Path(os.path.realpath(path))
        assert not (real == home or home in real.parents) or (home / "models") in [real, *real.parents], path
    assert Path("/") not in opened and Path("/usr") in opened
