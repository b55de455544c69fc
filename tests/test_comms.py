"""Framed messages over the coordinator's socket ends: every message arrives whole and in
order however the bytes are split, with reads into a reused buffer (issue 16, item 3)."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from jorbmp import _comms
from jorbmp._comms import HEADER, CoordinatorEnd, WorkerEnd, socket_pair

pytestmark = pytest.mark.timeout(60)


def _messages(rng: random.Random) -> list[bytes]:
    sizes = [0, 1, 3, 10, _comms.READ_SIZE - 4, _comms.READ_SIZE, 3 * _comms.READ_SIZE + 7]
    sizes += [rng.randrange(0, 5000) for _ in range(200)]
    rng.shuffle(sizes)
    return [bytes(rng.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1) for n in sizes]


def test_messages_split_anyhow_arrive_whole_and_in_order_then_eof() -> None:
    rng = random.Random(7)
    sent = _messages(rng)
    stream = b"".join(HEADER.pack(len(m)) + m for m in sent)
    got: list[bytes] = []
    closed = threading.Event()

    async def main() -> None:
        ours, theirs = socket_pair()
        loop = asyncio.get_running_loop()
        end = CoordinatorEnd(ours, loop, got.append, closed.set, lambda exc: None)

        def writer() -> None:
            pos = 0
            while pos < len(stream):  # odd chunk sizes: frames split at every place
                step = rng.choice([1, 2, 5, 4096, _comms.READ_SIZE + 1, 700_000])
                theirs.sendall(stream[pos : pos + step])
                pos += step
            theirs.close()

        thread = threading.Thread(target=writer)
        thread.start()
        while not closed.is_set():
            await asyncio.sleep(0.01)
        thread.join()
        assert end.closed

    asyncio.run(main())
    assert got == sent


def test_the_worker_end_reads_back_to_back_messages_of_every_size() -> None:
    rng = random.Random(11)
    sent = _messages(rng)
    ours, theirs = socket_pair()
    worker = WorkerEnd(theirs)

    def writer() -> None:
        for m in sent:
            ours.sendall(HEADER.pack(len(m)) + m)
        ours.close()

    thread = threading.Thread(target=writer)
    thread.start()
    got = []
    while (m := worker.recv()) is not None:
        got.append(m)
    thread.join()
    assert got == sent


def test_a_read_allocates_only_what_arrived() -> None:
    """``recv(READ_SIZE)`` allocated 256 KiB per read, which the allocator mapped, shrank
    and unmapped again: three system calls per message, a third of the coordinator's
    system time per job at concurrency 64. Reads go into a reused buffer now."""
    import tracemalloc

    got: list[bytes] = []

    async def main() -> None:
        ours, theirs = socket_pair()
        end = CoordinatorEnd(ours, asyncio.get_running_loop(), got.append, lambda: None, print)
        theirs.sendall(HEADER.pack(3) + b"abc")
        await asyncio.sleep(0.05)  # the first read sets this thread's buffer up
        tracemalloc.start()
        try:
            for n in range(50):
                theirs.sendall(HEADER.pack(10) + b"%010d" % n)
                end.drain()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        end.close()
        theirs.close()
        assert peak < 64 * 1024, f"{peak} bytes allocated at the peak of 50 small reads"

    asyncio.run(main())
    assert len(got) == 51 and got[-1] == b"0000000049"
