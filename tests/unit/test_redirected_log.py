"""The log a daemon's output was redirected into (`>> logs/hive.log 2>&1`, as
the queen starts hives) is rotated by the daemon itself: a real child process
with its stdout and stderr on the file, writing past the limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys
from pathlib import Path
from rbee.logfiles import RedirectedLog

log = RedirectedLog(Path(sys.argv[1]), max_bytes=4096, backups=2)
elsewhere = RedirectedLog(Path(sys.argv[2]), max_bytes=10)
for round in range(5):
    print("x" * 2000, flush=True)
    print("e" * 2000, file=sys.stderr, flush=True)
    print(f"round {round}", flush=True)
    assert not elsewhere.rotate_if_due()  # not the file our output goes to
    log.rotate_if_due()
print("last line", flush=True)
"""


def test_a_redirected_log_is_rotated_and_output_follows_the_fresh_file(tmp_path: Path) -> None:
    log = tmp_path / "hive.log"
    other = tmp_path / "other.log"
    other.write_text("y" * 100)
    with open(log, "a") as out:
        run = subprocess.run([sys.executable, "-c", CHILD, str(log), str(other)], stdout=out, stderr=subprocess.STDOUT)
    assert run.returncode == 0, log.read_text()[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["hive.log", "hive.log.1", "hive.log.2", "other.log"], names
    # The newest lines are in the fresh file, the ones before in .1; nothing past the backups kept.
    assert log.read_text().endswith("last line\n") and "round 4" in log.read_text()
    assert "round 3" in (tmp_path / "hive.log.1").read_text()
    assert all(p.stat().st_size <= 4096 + 4100 for p in tmp_path.glob("hive.log*"))
    assert other.read_text() == "y" * 100
