"""Module-level job types and execs for the reliability tests (importable by name, as
worker processes under ``spawn`` need)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
import signal
import subprocess
import threading
import time

import msgspec


class RJob(msgspec.Struct):
    """The job context of these tests; ``log`` is a file each exec appends to."""

    n: int
    log: str = ""
    blob: bytes = b""


def in_worker(state: str = "") -> bool:
    """True inside a jorbmp worker process (of ``state``, if given)."""
    name = multiprocessing.current_process().name
    return name.startswith(f"jorbmp-{state}") if state else name.startswith("jorbmp-")


class Poison(msgspec.Struct):
    """A context that kills the worker process that decodes it (n == 13)."""

    n: int

    def __post_init__(self) -> None:
        if self.n == 13 and in_worker():
            os._exit(5)


def ok(ac: object, oc: object, jc: object) -> tuple[object, str]:
    return jc, "done"


def note(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def first_time(jc: RJob, n: int, suffix: str) -> bool:
    """True for job ``n`` the first time it runs: notes the time in ``log + suffix``."""
    marker = jc.log + suffix
    if jc.n != n or os.path.exists(marker):
        return False
    note(marker, f"{time.time()}\n")
    return True


def log_then_die(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Sleeps 1 ms and notes (n, end time); job 60 kills its worker the first time."""
    if jc.n == 60 and not os.path.exists(jc.log + ".died"):
        time.sleep(0.001)  # dies after 1 ms of exec, as the others take
    if first_time(jc, 60, ".died"):
        os._exit(9)
    time.sleep(0.001)
    note(jc.log, f"{jc.n} {time.time()}\n")
    return jc, "done"


def slow_log_then_die(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Like `log_then_die`, with 12 ms execs: each one's results go back on their own."""
    if first_time(jc, 20, ".died"):
        os._exit(9)
    time.sleep(0.012)
    note(jc.log, f"{jc.n} {time.time()}\n")
    return jc, "done"


def die(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    os._exit(3)


def die_on_3_first_worker(ac: str, oc: object, jc: RJob) -> tuple[RJob, str]:
    if jc.n == 3 and ac == "first":
        os._exit(7)
    return jc, "done"


def slow_replacements() -> str:
    """ac_factory: the first worker is ready at once, replacements take 0.5 s."""
    if multiprocessing.current_process().name.endswith("-1"):
        return "first"
    time.sleep(0.5)
    return "replacement"


def cap_memory() -> None:
    """ac_factory: limit the worker's address space to 150 MiB above what it has."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (150 << 20), resource.RLIM_INFINITY))


BLOB = b"\x02" * (1 << 20)


def mib_result(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """A 1 MiB result: 256 of them in one message would not fit under `cap_memory`."""
    jc.blob = BLOB
    return jc, "done"


def huge_result(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Job 1's result is 3 MiB: over a frame limit that a test lowered to 1 MiB."""
    if jc.n == 1:
        jc.blob = b"\x01" * (3 << 20)
    return jc, "done"


def kicks_not_a_list(ac: object, oc: object, jc: RJob) -> tuple[RJob, str, RJob]:
    return jc, "done", jc


def idle_death_in_b() -> None:
    """ac_factory: workers of state "b" die 0.05 s after they are ready, while idle."""
    if in_worker("b"):
        threading.Timer(0.05, os._exit, (3,)).start()


def long_sleep(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    time.sleep(5)
    return jc, "done"


def sleep_child(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Runs a child process that outlives any timeout (its argument marks it)."""
    subprocess.run(["sleep", jc.log])
    return jc, "done"


def write_forever(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Starts a child process, then appends the time to its log every 50 ms for 20 s
    (as an orphan would go on); notes its pid and its child's."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup-minded code does
    path = f"{jc.log}.{jc.n}"
    child = subprocess.Popen(["sleep", "47.5"])
    note(path + ".child", f"{child.pid}\n")
    note(path + ".pid", f"{os.getpid()}\n")
    for _ in range(400):
        note(path, f"{time.time()}\n")
        time.sleep(0.05)
    return jc, "done"


async def raises_cancelled(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    if jc.n == 1:
        raise asyncio.CancelledError()
    return jc, "done"


async def cancels_own_task(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Awaits a task of its own that something cancels: CancelledError reaches the exec."""
    inner = asyncio.get_running_loop().create_task(asyncio.sleep(10))
    asyncio.get_running_loop().call_later(0.01, inner.cancel)
    await inner
    return jc, "done"


async def raises_timeout(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    raise TimeoutError("the service did not answer")


async def sleeps_long(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    await asyncio.sleep(30)
    return jc, "done"


async def async_2ms(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    await asyncio.sleep(0.002)
    return jc, "done"


def thread_2ms(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    time.sleep(0.002)
    return jc, "done"


def process_100ms(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    time.sleep(0.1)
    return jc, "done"


def fail_with_time(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Notes when it ran, then fails (job 0 only; the others succeed)."""
    note(jc.log, f"{jc.n} {time.time()}\n")
    if jc.n == 0:
        raise ConnectionRefusedError("service down")
    return jc, "done"


def slow_log_then_hang(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """12 ms execs that note (n, end time); job 10 hangs the first time (a timeout)."""
    if first_time(jc, 10, ".hung"):
        time.sleep(30)
    time.sleep(0.012)
    note(jc.log, f"{jc.n} {time.time()}\n")
    return jc, "done"


def feed_b(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Feeds state "b" (thread state): job 51 takes a while, the others 2 ms."""
    time.sleep(0.6 if jc.n == 51 else 0.002)
    return jc, "b"


def hang_50_once_keeping_fds(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """Job 50 hangs (for the state's timeout) the first time, after forking a helper
    that keeps the worker's fds open for 3 s: its death is seen late, while jobs keep
    arriving."""
    if jc.n == 50 and not os.path.exists(jc.log):
        note(jc.log, "hung\n")
        if os.fork() == 0:
            os.setsid()
            time.sleep(3)
            os._exit(0)
        time.sleep(100)
    time.sleep(0.0002)
    return jc, "done"


def spin_main(log: str) -> None:
    """A coordinator (run as a script by a test) that a timeout kill once made spin."""
    from jorbmp import Processor, Run, State

    run: Run[None, RJob] = Run("r", job_type=RJob)
    for i in range(300):
        run.add_job(RJob(n=i, log=log))
    states = [
        State("new", feed_b, kind="thread"),
        State("b", hang_50_once_keeping_fds, timeout=0.3, retry_delay=0),
        State("done", terminal=True),
    ]
    Processor(None, states, grace_period=1).exec(run)
    print("COMPLETE", run.counts(), flush=True)


def terminal_tool(ac: object, oc: object, jc: RJob) -> tuple[RJob, str, None, str]:
    """Runs a tool that sets the terminal's mode on the fd 0 it inherits (as ffmpeg,
    ssh or stty do); its outcome is recorded as the job's error text."""
    tool = "import termios; a = termios.tcgetattr(0); termios.tcsetattr(0, termios.TCSANOW, a)"
    try:
        done = subprocess.run(["python3", "-c", tool], timeout=5, capture_output=True)
        return jc, "done", None, f"tool rc={done.returncode}"
    except subprocess.TimeoutExpired:
        return jc, "done", None, "tool timed out"


def tty_main(method: str) -> None:
    from jorbmp import Processor, Run, State

    run: Run[None, RJob] = Run("r", job_type=RJob)
    run.add_job(RJob(n=0))
    Processor(
        None, [State("new", terminal_tool), State("done", terminal=True)], mp_context=method
    ).exec(run)
    print("RESULT", run.jobs["0"].state_errors["new"], flush=True)


def sqlite_ac() -> object:
    """ac_factory: a client that only works in the thread that made it."""
    import sqlite3

    return sqlite3.connect(":memory:")


def use_sqlite(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    ac.execute("select 1")  # type: ignore[attr-defined]
    return jc, "done"


_inline_running: list[int] = []
inline_overlap: list[int] = []


def slow_inline(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    _inline_running.append(jc.n)
    inline_overlap.append(len(_inline_running))
    time.sleep(1.0)
    _inline_running.remove(jc.n)
    return jc, "done"


def nested_inline(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    """An inline exec that runs a workflow of its own, inline too."""
    from jorbmp import Processor, Run, State

    inner: Run[None, RJob] = Run("inner", job_type=RJob)
    inner.add_job(RJob(n=jc.n))
    Processor(None, [State("new", ok), State("done", terminal=True)], inline=True).exec(inner)
    assert inner.counts() == {"done": 1}
    return jc, "done"


def hang_3s(ac: object, oc: object, jc: RJob) -> tuple[RJob, str]:
    time.sleep(3)
    return jc, "done"


def make_ac() -> str:
    return "ac"
