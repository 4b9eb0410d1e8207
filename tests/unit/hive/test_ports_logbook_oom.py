import asyncio
import socket

import pytest

from rbee_hive.logbook import HIVE_SOURCE, LogBook
from rbee.kernel_log import KernelRecord, oom_kills
from rbee_hive.workers.oom import kernel_log_mark, killed_by_oom
from rbee_hive.workers.ports import PortAllocator, port_is_free



def test_a_listening_port_is_not_free_and_the_allocator_skips_reserved():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not port_is_free("127.0.0.1", taken)
    alloc = PortAllocator("127.0.0.1", 7000, 7003)
    alloc.reserve(7001)
    assert list(alloc.candidates()) == [7000, 7002, 7003]
    alloc.release(7001)
    assert list(alloc.candidates()) == [7000, 7001, 7002, 7003]
    err = alloc.exhausted([7000, 7001])
    assert err.code == "NO_FREE_PORT" and "7000-7003" in err.message


@pytest.mark.asyncio(loop_scope="session")
async def test_logbook_writes_tails_and_follows(tmp_path):
    book = LogBook(tmp_path / "logs")
    book.write(HIVE_SOURCE, "hello")
    book.write("worker-1", "one\n")
    book.write("worker-1", "two")
    assert book.sources() == [HIVE_SOURCE, "worker-1"]
    assert book.tail("worker-1", 1) == ["two"]
    assert (tmp_path / "logs" / "worker-1.log").read_text() == "one\ntwo\n"
    with book.follow("worker-1") as follower:
        book.write(HIVE_SOURCE, "not for this follower")
        book.write("worker-1", "three")
        assert await asyncio.wait_for(follower.next(), 5) == ("worker-1", "three")
    with pytest.raises(ValueError):
        book.path_for("../escape")
    book.close_all()


KERNEL_LINES = [
    "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/x,task_memcg=/x,task=python3,pid=4242,uid=0",
    "Memory cgroup out of memory: Killed process 4242 (python3) total-vm:1234kB, anon-rss:999kB",
]


def mentions_oom_kill(lines: list[str], pid: int) -> bool:
    return pid in oom_kills((KernelRecord(i, line) for i, line in enumerate(lines)), [pid])


def test_oom_kill_is_recognised_by_pid():
    assert mentions_oom_kill(KERNEL_LINES, 4242)
    assert mentions_oom_kill(KERNEL_LINES[1:2], 4242)
    assert not mentions_oom_kill(KERNEL_LINES, 424)
    assert not mentions_oom_kill(KERNEL_LINES, 42421)


def test_kernel_log_unreadable_means_unknown(tmp_path):
    assert kernel_log_mark(tmp_path / "no-such-device") == -1
    assert not killed_by_oom(4242, path=tmp_path / "no-such-device")


def test_only_kills_after_the_workers_start_count(tmp_path):
    # An old kill of pid 4242 (seq 7), then the worker with that pid reused starts (mark 9).
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("".join(f"6,{seq},0,-;{line}\n" for seq, line in ((7, KERNEL_LINES[2]), (9, "boot of something"))))
    mark = kernel_log_mark(kmsg)
    assert mark == 9
    assert killed_by_oom(4242, path=kmsg)  # the whole log names it
    assert not killed_by_oom(4242, mark, kmsg)  # but not since the start
    with kmsg.open("a") as f:
        f.write(f"6,12,0,-;{KERNEL_LINES[2]}\n")
    assert killed_by_oom(4242, mark, kmsg)
