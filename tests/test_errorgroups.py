"""Errors grouped by kind (issue 19, item 5): the fingerprint of an error text, the
groups, and ``python -m jorbmp status`` showing them for real runs in every format."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import (
    FAILED,
    JournalSerializer,
    JsonSerializer,
    Processor,
    Run,
    SqliteSerializer,
    State,
    errorgroups,
)
from jorbmp.errorgroups import ErrorGrouper, fingerprint, group_errors, text_lines

SERIALIZERS: dict[str, Any] = {
    "json": JsonSerializer,
    "journal": JournalSerializer,
    "sqlite": SqliteSerializer,
}
UPLOAD = "ConnectionError: upload of <path> reset by peer (simulated)"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jorbmp", *args], capture_output=True, text=True, timeout=timeout
    )


# -- the fingerprint ---------------------------------------------------------------

CASES = [
    ("ConnectionError: upload of file-0003.txt reset by peer (simulated)", UPLOAD),
    ("", ""),
    ("   ", ""),
    ("KeyError: 'file-0003.txt'", "KeyError: <str>"),
    (
        "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/x/y.txt'",
        "FileNotFoundError: [Errno <n>] No such file or directory: <str>",
    ),
    (
        "OSError: cannot open /data/part-00012.parquet: denied",
        "OSError: cannot open <path>: denied",
    ),
    (r"C:\Users\bob\data\x.csv not found", "<path> not found"),
    (r"D:/work/run 7 failed", "<path> <n> failed"),
    (r"\\server\share\dir\f.txt gone", "<path> gone"),
    ("see ./rel/path and ../up/x and ~/home/f, and/or", "see <path> and <path> and <path>, and/or"),
    ("GET https://api.example.com/v1/items/123?x=1 returned 503", "GET <url> returned <n>"),
    ("s3://bucket/key-17 missing", "<url> missing"),
    (
        "sha256 mismatch: expected 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "sha256 mismatch: expected <hex>",
    ),
    ("<Obj object at 0x7f3a9c12ab30>", "<Obj object at <hex>>"),
    ("uuid 123e4567-e89b-12d3-a456-426614174000 missing", "uuid <hex> missing"),
    # Numbers inside words stay (sha256, v2, E12, x86, utf8); numbers standing alone go.
    ("v2 api: E12 on x86 utf8 (shard 4 of 16)", "v2 api: E12 on x86 utf8 (shard <n> of <n>)"),
    ("timed out after 10.5s (1,234 rows)", "timed out after <n>s (<n> rows)"),
    ("worker died (exit code -9)", "worker died (exit code -<n>)"),
    ("job-17 and job_18 failed", "job-<n> and job_<n> failed"),
    # A message's words, its apostrophes and dotted names stay.
    ("can't decode byte 0xff in position 12", "can't decode byte <hex> in position <n>"),
    (
        "requests.exceptions.ConnectionError: max retries",
        "requests.exceptions.ConnectionError: max retries",
    ),
    ('said "hello world" then', "said <str> then"),
    (
        "caf\u00e9 \u00fcnicode \u043e\u0448\u0438\u0431\u043a\u0430 12 \u0663",
        "caf\u00e9 \u00fcnicode \u043e\u0448\u0438\u0431\u043a\u0430 <n> \u0663",
    ),
    ("a\nmulti-line\ttext\n", "a multi-line text"),
    ("failed at 2026-12-01T19:09:03.5Z on db-2", "failed at <time> on db-<n>"),
    ("ratio 1/2 at 10.0.0.1:8080, 95%", "ratio <n>/<n> at <n>:<n>, <n>%"),
    ("v1.2.3 on Python 3.11.7", "v1.2.3 on Python <n>"),  # a version inside a word stays whole
    ("deadbeef is a word here, defaced too", "deadbeef is a word here, defaced too"),
    # Runs of path characters with @ % + = ~ inside: a bare file name is the whole run.
    ("copy a@b.txt and report=2026.csv failed", "copy <path> and <path> failed"),
    ("mail a@b.c to x+y@mail.example.org failed", "mail <path> to x+y@mail.example.org failed"),
    ("token %00%01%02 bad, form k=v%20x+y", "token %<n>%<n>%<n> bad, form k=v%<n>x+y"),
    ("saved 2026-12-01T10:10:03Z@backup.tar.gz, 1,234@f.txt", "saved <time>@<path>, <n>@<path>"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("text", "expected"), CASES)
def test_fingerprint(text: str, expected: str) -> None:
    assert fingerprint(text) == expected


# Runs of path characters that a bare file name once rescanned from each @ % + = ~
# inside them (quadratic: 16 KB of "a@b." took 7.9 s; a job's 24 KB error of them held
# the end of exec 17.5 s, and `status` 19 s).
PATH_RUNS = ["a@b.", "x%20", "a=", "a+", "ab~", "%00%01"]


def uncut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fingerprint whole texts, however long: time the pass itself, not the cut."""
    monkeypatch.setattr(errorgroups, "SCANNED_CHARS", 10**8, raising=False)


def took(text: str, tries: int = 1) -> float:
    """The least time `fingerprint` took on ``text`` in ``tries`` tries."""
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        fingerprint(text)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.timeout(60)
def test_fingerprint_is_linear_on_hostile_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """No catastrophic backtracking: each 100 KB pathological text, uncut, in well under
    a second (about 0.05-0.1 s here), 1 MB texts in about 0.5 s; the result stays short."""
    uncut(monkeypatch)
    hostile = [
        "a." * 50_000, "'a" * 50_000, "'a'b" * 25_000, "/" * 100_000, "/a" * 50_000,
        "a/" * 50_000, "a" * 100_000, "0" * 100_000, "a1" * 50_000, "0x" * 50_000,
        "1." * 50_000, "1," * 50_000, "C:" * 50_000, "C:\\" * 33_000, "\\\\a" * 33_000,
        "a-" * 50_000, "a.txt." * 16_000, "ab.tx" * 20_000, "http://" * 14_000,
        "a://" * 25_000, '"x' * 50_000, "9f" * 50_000 + "z", ".a" * 50_000, "~/" * 50_000,
        "../" * 33_000, "12345678-" * 11_000, "deadbeef-dead-" * 7_000, "\u00e9" * 100_000,
    "2026-12-01T" * 9_000, "2026-12-01 10:10" * 6_000, "1-1-1-1" * 14_000,
    *(unit * (100_000 // len(unit)) for unit in PATH_RUNS),
    ]  # fmt: skip
    for text in hostile:
        started = time.perf_counter()
        result = fingerprint(text)
        took = time.perf_counter() - started
        assert took < 1.0, (text[:20], took)
        assert len(result) <= 500
    for text in ("a1./'\" x0f~\u00e9-_:\\" * 70_000, f"{CASES[0][0]} " * 15_000):
        assert len(text) > 1_000_000
        started = time.perf_counter()
        fingerprint(text)
        assert time.perf_counter() - started < 10.0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit", PATH_RUNS)
def test_fingerprint_is_linear_on_runs_of_path_characters(
    unit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare file name starts only where a run of path characters starts, so a run is
    scanned once however many @ % + = ~ it holds: uncut, 4x the text takes about 4x the
    time (16x when it was quadratic), 256 KB in about 0.15 s here. As `fingerprint` cuts
    them, 64 KB and 1 MB texts of them take about 0.03-0.08 s."""
    uncut(monkeypatch)
    times = {}
    for size in (16_384, 65_536, 262_144):
        times[size] = took(unit * (size // len(unit)), tries=3)
        assert times[size] < 2.0, (unit, size, times)
    assert times[262_144] < 8 * times[65_536], (unit, times)
    monkeypatch.undo()
    for size in (65_536, 1_048_576):
        text = "bad recipients: " + unit * (size // len(unit))
        assert took(text) < 2.0, (unit, size)
        assert len(fingerprint(text)) <= 500


@pytest.mark.timeout(60)
def test_a_long_text_is_fingerprinted_on_its_first_part() -> None:
    """Past `SCANNED_CHARS` (64 KB) a text is fingerprinted on its first part: the work
    per text is bounded, and the group is the same, the fingerprint being told by its
    first 500 characters; a token cut there (a URL) is still one placeholder."""
    cap = errorgroups.SCANNED_CHARS
    head = f"{CASES[0][0]} " * 2_000
    assert len(head) > cap
    texts = [head, head + "x" * 1_000_000, head + " then 'another' error at /x/y.txt"]
    assert {fingerprint(t) for t in texts} == {fingerprint(head[:cap])}
    assert fingerprint(head).startswith(f"{UPLOAD} {UPLOAD} ")
    assert fingerprint("GET https://h/" + "a" * 2 * cap + " failed") == "GET <url>"
    # Blanks are the slowest text per character (every alternative tried at each).
    for text in (" " * 10_000_000, "a@b." * 2_500_000):
        assert took(text) < 1.0


# -- groups ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_groups_count_each_job_once_and_say_where_the_jobs_are_now() -> None:
    grouper = ErrorGrouper()
    # Retried in 'upload', then done: an old error. Twice in one job: counted once.
    grouper.add("0", "done", {"upload": ["E: host 1 down", "E: host 2 down"]})
    # Still in 'upload', waiting for another try: a current error.
    grouper.add("1", "upload", {"upload": ["E: host 3 down"]})
    # Recorded in two states, now parked in 'failed'.
    grouper.add("2", FAILED, {"fetch": ["E: host 4 down"], "upload": ["E: host 5 down"]})
    grouper.add("3", "done", {"upload": ["ValueError: bad"]})
    (hosts, bad) = grouper.groups()
    assert hosts.fingerprint == "E: host <n> down"
    assert (hosts.jobs, hosts.current, hosts.moved) == (3, 1, {"done": 1, FAILED: 1})
    assert hosts.states == {"upload": 3, "fetch": 1}
    assert hosts.examples == ["0", "1", "2"]
    assert hosts.texts == ["E: host 1 down", "E: host 2 down", "E: host 3 down"]  # 3 kept
    assert (bad.fingerprint, bad.jobs, bad.current) == ("ValueError: bad", 1, 0)
    assert grouper.kinds() == 2
    assert [g.fingerprint for g in grouper.groups(top=1)] == [hosts.fingerprint]
    assert group_errors([("9", "x", {})]) == []


@pytest.mark.timeout(30)
def test_groups_of_empty_and_megabyte_texts_stay_small() -> None:
    big = "OSError: " + "x" * 1_000_000
    empty, long = group_errors([("0", "s", {"s": [big]}), ("1", "s", {"s": ["", "  "]})])
    assert (empty.fingerprint, empty.texts) == ("", ["", "  "])
    assert len(long.fingerprint) == 500 and long.fingerprint.endswith("...")
    assert [len(t) for t in long.texts] == [4000]  # kept cut: 100k such kinds fit
    lines = text_lines([empty, long], 2)
    assert "(an empty text)" in lines[1]
    assert max(map(len, lines)) < 600


# -- status on real runs -------------------------------------------------------------


class Upload(msgspec.Struct):
    n: int


def upload_text(jc: Upload) -> str:
    return f"upload of file-{jc.n:04d}.txt reset by peer (simulated)"


def first(ac: Any, oc: Any, jc: Upload) -> Any:
    """Jobs 0, 5, 10 ... and 3, 13, 23 ... fail their first upload (a returned error)."""
    if jc.n % 5 == 0 or jc.n % 10 == 3:
        return jc, "upload", None, f"ConnectionError: {upload_text(jc)}"
    return jc, "done"


def again(ac: Any, oc: Any, jc: Upload) -> Any:
    """The second try: 0, 5, 10 ... succeed; 3, 13, 23 ... raise until parked."""
    if jc.n % 10 == 3:
        raise ConnectionError(upload_text(jc))
    return jc, "done"


def upload_run(kind: str, path: Path) -> None:
    run: Run[None, Upload] = Run("uploads", None, Upload)
    for n in range(40):
        run.add_job(Upload(n=n))
    states = [
        State("new", first, kind="thread"),
        State("upload", again, kind="thread", max_retries=2, retry_delay=0),
        State("done", terminal=True),
    ]
    Processor(None, states, SERIALIZERS[kind](path, job_type=Upload)).exec(run)
    # 8 jobs (0, 5, ...) retried and went on; 4 (3, 13, 23, 33) were parked in failed.
    assert run.counts() == {"done": 36, FAILED: 4}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", list(SERIALIZERS))
def test_status_groups_errors_that_differ_only_in_a_file_name(kind: str, tmp_path: Path) -> None:
    """The demo's upload errors, one per file name, are one group: its count, the states
    that recorded it, where those jobs are now (old, resolved errors apart from
    current ones), example ids and raw texts; in the text and in ``--json``."""
    path = tmp_path / f"run.{kind}"
    upload_run(kind, path)
    out = cli("status", str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["error_kinds"] == 1
    (group,) = data["errors"]
    assert group["fingerprint"] == UPLOAD
    assert group["jobs"] == 8 + 4
    assert group["states"] == {"new": 12, "upload": 4}
    assert (group["current"], group["moved"]) == (0, {"done": 8, FAILED: 4})
    assert group["examples"] == ["0", "3", "5", "10", "13"]
    assert group["texts"] == [
        f"ConnectionError: upload of file-{n:04d}.txt reset by peer (simulated)" for n in (0, 3, 5)
    ]
    text = cli("status", str(path))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "errors by kind (1 kind):" in lines
    assert f"  {'12 jobs':>10}  {UPLOAD}" in lines
    assert any(
        "recorded in 'new' 12, 'upload' 4; old: all 12 jobs left that state since "
        "(now 'done' 8, 'failed' 4)" in line
        for line in lines
    ), text.stdout
    assert any("e.g. jobs 0, 3, 5, 10, 13" in line for line in lines)
    assert "'ConnectionError: upload of file-0005.txt reset by peer (simulated)'" in text.stdout


@pytest.mark.timeout(120)
def test_status_says_which_errors_are_current(tmp_path: Path) -> None:
    """Jobs still in the state that recorded their error (a stopped run) are told
    apart from those that left it."""
    path = tmp_path / "run.json"
    run: Run[None, Upload] = Run("r", None, Upload)
    for n in range(4):
        job = run.jobs[run.add_job(Upload(n=n), state="upload" if n < 3 else "done")]
        job.state_errors["upload"] = [f"TimeoutError: after {n + 1}.5 s"]
    JsonSerializer(path, job_type=Upload).serialize(run)
    out = cli("status", str(path))
    assert out.returncode == 0, out.stderr
    assert "    4 jobs  TimeoutError: after <n> s" in out.stdout
    assert "recorded in 'upload'; 3 still there, 1 left it since (now 'done' 1)" in out.stdout


@pytest.mark.timeout(180)
def test_status_of_100k_kinds_of_error_stays_fast_and_short(tmp_path: Path) -> None:
    """100,000 jobs, each with an error of its own kind (different words): status
    counts them all, prints the 10 biggest, and says how many kinds there are."""
    path = tmp_path / "run.json"
    run: Run[None, Upload] = Run("many", None, Upload)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for n in range(100_000):
        job = run.jobs[run.add_job(Upload(n=n), state=FAILED)]
        word = "".join(letters[(n // 26**i) % 26] for i in range(4))
        job.state_errors["new"] = [f"ValueError: no {word} in /data/in-{n}.csv"]
    JsonSerializer(path, job_type=Upload).serialize(run)
    started = time.perf_counter()
    out = cli("status", str(path), timeout=150)
    took = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    assert "errors by kind (the 10 biggest of 100000 kinds):" in out.stdout
    assert len(out.stdout.splitlines()) < 80
    assert "ValueError: no aaaa in <path>" in out.stdout
    assert took < 120, took  # about 2.5 s here (generous: a loaded host)
