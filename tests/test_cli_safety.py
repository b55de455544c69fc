"""``python -m jorbmp status|redrive`` where things are not as they should be: another
user's checkpoint, read-only media, no write access, something that is not a checkpoint
file, a terminal that is not UTF-8, a newer format, a mistyped state.

Real files, real processes: each command runs as ``python -m jorbmp`` in a child, as
another user where a test says so (``subprocess.run(user=...)``, which needs root: CI
runs the tests as root). Every failure must be one line on stderr, never a traceback,
and must leave every file as it was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pwd
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jorbmp import FAILED, Job, JournalSerializer, JsonSerializer, Run, SqliteSerializer

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(
    not ROOT, reason="acting as another user (chown, setuid, mount) needs root; CI runs as root"
)


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


# The other user (owner of the checkpoints root works on), and a group that is neither
# theirs nor root's, to tell a kept group from a reset one.
OWNER_UID, OWNER_GID = _nobody()
OTHER_GID = 4242 if OWNER_GID != 4242 else 4243

SERIALIZERS: dict[str, Any] = {
    "json": JsonSerializer,
    "journal": JournalSerializer,
    "sqlite": SqliteSerializer,
}
FORMATS = list(SERIALIZERS)

# Non-latin text in an error: a latin-1 character, a symbol, CJK.
ERROR = "ValueError: caf\u00e9 \u2713 \u5931\u6557"


class JC(msgspec.Struct):
    n: int


def make_checkpoint(fmt: str, path: Path, *, failed_state: str = FAILED) -> Path:
    """Three jobs in ``failed_state`` with `ERROR`, one done; no lock file left beside it
    (each test makes the one its story needs)."""
    run: Run[None, JC] = Run("r\u00e9", None, JC)
    for n in range(3):
        job_id = run.add_job(JC(n=n), state=failed_state)
        run.jobs[job_id].state_errors["fetch"] = [ERROR]
    run.add_job(JC(n=3), state="done")
    SERIALIZERS[fmt](path, job_type=JC).serialize(run)
    path.with_name(path.name + ".lock").unlink(missing_ok=True)
    return path


def checkpoint_name(fmt: str) -> str:
    return {"json": "run.json", "journal": "run.journal", "sqlite": "run.db"}[fmt]


def listing(directory: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry of ``directory``: owner, group, mode and a hash of its content (not
    of an SQLite -shm file's: shared memory, which every reader of a database with a
    -wal file updates)."""
    entries = {}
    for name in sorted(os.listdir(directory)):
        st = os.lstat(directory / name)
        digest = ""
        if stat.S_ISREG(st.st_mode) and not name.endswith("-shm"):
            digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        entries[name] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), digest)
    return entries


# Where the other user cannot run this interpreter (a Python installed under root's
# 0700 home), the child starts as root, imports the command line, then drops to the
# other user before it runs: every file jorbmp touches is touched as that user.
DROP_THEN_RUN = """
import os, sys
import encodings.ascii, encodings.latin_1
import jorbmp.cli
uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([int(g) for g in groups.split(",") if g]); os.setgid(gid); os.setuid(uid)
sys.exit(jorbmp.cli.main(sys.argv[4:]))
"""


@functools.cache
def other_user_can_exec() -> bool:
    """Whether the other user can run ``python -m jorbmp`` with this interpreter."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import jorbmp.cli"],
            capture_output=True,
            timeout=30,
            cwd="/",
            user=OWNER_UID,
            group=OWNER_GID,
            extra_groups=[],
        )
    except OSError:  # the interpreter itself cannot be run by that user
        return False
    return probe.returncode == 0


def cli(
    *args: str | Path,
    as_owner: bool = False,
    groups: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``python -m jorbmp ARGS`` in a child; ``as_owner``: as the other user, in no
    supplementary groups but ``groups``."""
    command = [sys.executable, "-m", "jorbmp", *map(str, args)]
    extra: dict[str, Any] = {}
    if as_owner:
        if other_user_can_exec():
            extra = {"user": OWNER_UID, "group": OWNER_GID, "extra_groups": list(groups)}
        else:
            ids = [str(OWNER_UID), str(OWNER_GID), ",".join(map(str, groups))]
            command = [sys.executable, "-c", DROP_THEN_RUN, *ids, *map(str, args)]
    return subprocess.run(command, capture_output=True, timeout=30, env=env, cwd="/", **extra)


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode("utf-8", "backslashreplace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode("utf-8", "backslashreplace")


def one_line_error(
    result: subprocess.CompletedProcess[bytes], naming: str | Path, code: int = 2
) -> str:
    """The child failed with ``code`` and one line on stderr that names ``naming``."""
    stderr = err(result)
    assert result.returncode == code, (result.returncode, out(result), stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(naming) in lines[0], lines[0]
    assert lines[0].startswith("jorbmp: "), lines[0]
    return lines[0]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the other user can enter and read but not write (root's, 0755), in
    /tmp (which everyone may enter, unlike pytest's own, 0700)."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    directory = Path(tempfile.mkdtemp(prefix="jorbmp-cli-safety-", dir=base))
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def read_only_mount(source: Path) -> Iterator[Path]:
    """``source`` seen through a read-only bind mount; skips where mounting is refused."""
    if shutil.which("mount") is None or not ROOT:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    target = Path(tempfile.mkdtemp(prefix="jorbmp-cli-ro-"))
    try:
        for command in (
            ["mount", "--bind", str(source), str(target)],
            ["mount", "-o", "remount,ro,bind", str(target)],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                if command[1] != "--bind":
                    subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)
                pytest.skip(f"this machine refuses {' '.join(command)}: {done.stderr.strip()}")
        try:
            assert not os.access(target, os.W_OK), "the bind mount is not read-only"
            yield target
        finally:
            subprocess.run(["umount", str(target)], capture_output=True, timeout=30)
            if os.path.ismount(target):
                subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)
    finally:
        with contextlib.suppress(OSError):
            target.rmdir()


CRASH_LEAVING_A_LOG = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("UPDATE jobs SET state = 'new' WHERE id = '0'")
os._exit(0)  # killed: the committed change is only in the -wal file
"""


def crash_leaving_a_log(db: Path) -> None:
    """A writer that committed one change (job 0 back to 'new') and died: the database
    has a -wal (and -shm) file beside it that holds the change."""
    subprocess.run([sys.executable, "-c", CRASH_LEAVING_A_LOG, str(db)], check=True, timeout=30)
    assert db.with_name(db.name + "-wal").stat().st_size > 0


# -- another user ----------------------------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_another_user_who_cannot_read_it_gets_one_line(fmt: str, public_dir: Path) -> None:
    path = make_checkpoint(fmt, public_dir / checkpoint_name(fmt))
    os.chmod(path, 0o600)  # root's, as created: the other user may not read it
    before = listing(public_dir)
    for args in (
        ("status", path),
        ("status", path, "--json"),
        ("redrive", path, "--from", FAILED, "--to", "new", "--dry-run"),
        ("redrive", path, "--from", FAILED, "--to", "new"),
    ):
        result = cli(*args, as_owner=True)
        one_line_error(result, path)
        assert out(result) == ""
    assert listing(public_dir) == before


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("lock_file", [False, True], ids=["no-lock-file", "root-lock-file"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_status_and_dry_run_need_no_write_access(
    fmt: str, lock_file: bool, public_dir: Path
) -> None:
    """A readable checkpoint in a directory the user cannot write, its lock file
    (if any) root's and owner-only: `status` and `redrive --dry-run` work and create
    nothing."""
    path = make_checkpoint(fmt, public_dir / checkpoint_name(fmt))
    os.chmod(path, 0o644)
    if lock_file:
        lock = path.with_name(path.name + ".lock")
        lock.write_bytes(b"")
        os.chmod(lock, 0o600)
    before = listing(public_dir)

    result = cli("status", path, as_owner=True)
    assert result.returncode == 0, err(result)
    assert "failed  3" in out(result) and "done    1" in out(result)
    result = cli("status", path, "--json", as_owner=True)
    assert result.returncode == 0, err(result)
    assert json.loads(result.stdout)["states"] == {FAILED: 3, "done": 1}
    result = cli("redrive", path, "--from", FAILED, "--to", "new", "--dry-run", as_owner=True)
    assert result.returncode == 0, err(result)
    assert "would move 3 jobs" in out(result)

    assert listing(public_dir) == before


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "how", ["directory-not-writable", "file-read-only"], ids=["no-dir-write", "file-0444"]
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_redrive_that_cannot_write_changes_nothing(fmt: str, how: str, public_dir: Path) -> None:
    """No write permission: one line naming the file, exit code 2, no file changed and
    none (a lock file) created. ``file-0444``: the user's own checkpoint, made read-only,
    in a directory they may write (replacing it by rename would be possible, and wrong)."""
    directory = public_dir
    if how == "file-read-only":
        directory = public_dir / "own"
        directory.mkdir()
        os.chown(directory, OWNER_UID, OWNER_GID)
    path = make_checkpoint(fmt, directory / checkpoint_name(fmt))
    if how == "file-read-only":
        os.chown(path, OWNER_UID, OWNER_GID)
        os.chmod(path, 0o444)
    else:
        os.chmod(path, 0o644)
    before = listing(directory)
    result = cli("redrive", path, "--from", FAILED, "--to", "new", as_owner=True)
    one_line_error(result, path)
    assert out(result) == ""
    assert listing(directory) == before


# -- root on another user's checkpoint -------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_redrive_as_root_keeps_owner_group_and_mode(fmt: str, public_dir: Path) -> None:
    """An operator runs `redrive` as root on a user's checkpoint (owner, another group,
    0640): afterwards the file has the same owner, group and mode, everything root left
    beside it (the lock file it made) belongs to the owner, and the owner's own redrive
    and status still work (the owner is a member of the file's group, as people who
    share a file by its group are)."""
    directory = public_dir / "users"
    directory.mkdir()
    os.chown(directory, OWNER_UID, OWNER_GID)
    path = make_checkpoint(fmt, directory / checkpoint_name(fmt))
    os.chown(path, OWNER_UID, OTHER_GID)
    os.chmod(path, 0o640)

    result = cli("redrive", path, "--from", FAILED, "--to", "retry", "--force")
    assert result.returncode == 0, err(result)
    assert "moved 3 jobs" in out(result)

    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OWNER_UID, OTHER_GID, 0o640)
    for name, (uid, _gid, mode, _digest) in listing(directory).items():
        assert uid == OWNER_UID, f"{name} belongs to uid {uid}, mode {mode:o}"
    assert SERIALIZERS[fmt](path, job_type=JC).deserialize().counts() == {"retry": 3, "done": 1}

    result = cli(
        "redrive", path, "--from", "retry", "--to", FAILED, as_owner=True, groups=(OTHER_GID,)
    )
    assert result.returncode == 0, err(result)
    assert "moved 3 jobs" in out(result)
    result = cli("status", path, "--json", as_owner=True, groups=(OTHER_GID,))
    assert result.returncode == 0, err(result)
    assert json.loads(result.stdout)["states"] == {FAILED: 3, "done": 1}
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OWNER_UID, OTHER_GID, 0o640)


# -- read-only media -------------------------------------------------------------------


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_media(fmt: str, public_dir: Path) -> None:
    """On a read-only file system: `status` and `--dry-run` work; `redrive` is one line
    that says why, exit code 2."""
    make_checkpoint(fmt, public_dir / checkpoint_name(fmt))
    before = listing(public_dir)
    with read_only_mount(public_dir) as media:
        path = media / checkpoint_name(fmt)
        result = cli("status", path)
        assert result.returncode == 0, err(result)
        assert "failed  3" in out(result)
        result = cli("redrive", path, "--from", FAILED, "--to", "new", "--dry-run")
        assert result.returncode == 0, err(result)
        assert "would move 3 jobs" in out(result)
        result = cli("redrive", path, "--from", FAILED, "--to", "new")
        line = one_line_error(result, path)
        assert "read-only" in line
    assert listing(public_dir) == before


@needs_root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("shm", [True, False], ids=["wal-and-shm", "wal-only"])
def test_read_only_media_with_an_sqlite_log_left_by_a_crash(shm: bool, public_dir: Path) -> None:
    """A crashed writer left a -wal file (with a committed change) and maybe its -shm
    file; the disk is then read-only. `status` and `redrive --dry-run` see the committed
    change, or, where it cannot be read, say so in one line; never the run without it."""
    db = make_checkpoint("sqlite", public_dir / "run.db")
    crash_leaving_a_log(db)
    if not shm:
        db.with_name(db.name + "-shm").unlink()
    before = listing(public_dir)
    with read_only_mount(public_dir) as media:
        path = media / "run.db"
        result = cli("status", path, "--json")
        if result.returncode == 0:
            assert json.loads(result.stdout)["states"] == {FAILED: 2, "done": 1, "new": 1}
        else:
            one_line_error(result, path)
        result = cli("redrive", path, "--from", FAILED, "--to", "new", "--dry-run")
        if result.returncode == 0:
            assert "would move 2 jobs" in out(result)
        else:
            one_line_error(result, path)
    assert listing(public_dir) == before


# -- not a checkpoint file -------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_what_is_not_a_checkpoint_file(kind: str, tmp_path: Path) -> None:
    """A directory, or a FIFO (a read would wait forever for a writer): one line."""
    path = tmp_path / "run.json"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    before = listing(tmp_path)
    for args in (
        ("status", path),
        ("redrive", path, "--from", FAILED, "--to", "new"),
        ("redrive", path, "--from", FAILED, "--to", "new", "--dry-run"),
    ):
        one_line_error(cli(*args), path)
    assert listing(tmp_path) == before


# -- SQLite: a dry run writes nothing --------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("crashed", [False, True], ids=["closed", "log-left-by-a-crash"])
def test_sqlite_dry_run_and_status_leave_no_files(crashed: bool, tmp_path: Path) -> None:
    """`redrive --dry-run` and `status` of an SQLite checkpoint leave no -wal or -shm
    file that was not there, and change none that was; with a log left by a crash, they
    see its committed change."""
    db = make_checkpoint("sqlite", tmp_path / "run.db")
    if crashed:
        crash_leaving_a_log(db)
    before = listing(tmp_path)
    moving = 2 if crashed else 3
    result = cli("redrive", db, "--from", FAILED, "--to", "new", "--dry-run")
    assert result.returncode == 0, err(result)
    assert f"would move {moving} jobs" in out(result)
    assert listing(tmp_path) == before
    result = cli("status", db, "--json")
    assert result.returncode == 0, err(result)
    assert json.loads(result.stdout)["states"][FAILED] == moving
    assert listing(tmp_path) == before


# -- terminals that are not UTF-8 ------------------------------------------------------

UNICODE_ID = "\u30b8\u30e7\u30d6-\u2713"  # a job id in katakana, with a check mark
LOCALES: dict[str, dict[str, str]] = {
    "latin-1": {"PYTHONIOENCODING": "latin-1"},
    "ascii": {"PYTHONIOENCODING": "ascii"},
    # The C locale without Python's UTF-8 mode and locale coercion: ASCII everywhere,
    # the command line's non-ASCII bytes as surrogates.
    "C": {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"},
}


def locale_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIO"))}
    env.pop("LANG", None)
    env.pop("PYTHONUTF8", None)
    env.update(LOCALES[name])
    return env


@pytest.mark.timeout(120)
@pytest.mark.parametrize("locale", list(LOCALES))
def test_output_where_stdout_is_not_utf8(locale: str, tmp_path: Path) -> None:
    """What the terminal cannot show is escaped (``\\u2713``), what it can is shown as
    it is; nothing crashes; state names given on the command line still match."""
    encoding = "latin-1" if locale == "latin-1" else "ascii"
    env = locale_env(locale)
    path = make_checkpoint("json", tmp_path / "run.json", failed_state="\u5931\u6557")
    run = JsonSerializer(path, job_type=JC).deserialize()
    run.jobs[UNICODE_ID] = Job(id=UNICODE_ID, context=JC(n=9), state="\u5931\u6557")
    run.jobs[UNICODE_ID].state_errors["fetch"] = [ERROR]
    JsonSerializer(path, job_type=JC).serialize(run)

    result = cli("status", path, env=env)
    assert result.returncode == 0, err(result)
    assert "Traceback" not in err(result)
    text = result.stdout.decode(encoding)  # only what that encoding can hold
    assert "\\u2713" in text and "\\u5931\\u6557" in text and "\\u30b8" in text
    assert ("caf\u00e9" if encoding == "latin-1" else "caf\\xe9") in text

    result = cli("status", path, "--json", env=env)
    assert result.returncode == 0, err(result)
    data = json.loads(result.stdout.decode(encoding))
    assert data["states"] == {"\u5931\u6557": 4, "done": 1}
    assert data["errors"][0]["texts"] == [ERROR]
    assert UNICODE_ID in data["errors"][0]["examples"]

    result = cli("redrive", path, "--from", "\u5931\u6557", "--to", "\u65b0", "--force", env=env)
    assert result.returncode == 0, err(result)
    assert "moved 4 jobs" in result.stdout.decode(encoding)
    assert JsonSerializer(path, job_type=JC).deserialize().counts() == {"\u65b0": 4, "done": 1}

    missing = tmp_path / "n\u00f6-\u2713.json"
    result = cli("status", missing, env=env)
    assert result.returncode == 2
    assert "Traceback" not in err(result)
    assert len(result.stderr.decode(encoding).strip().splitlines()) == 1


# -- a newer format --------------------------------------------------------------------


def newer_format(variant: str, tmp_path: Path) -> Path:
    """A checkpoint as a (hypothetical) format 2 would write it."""
    if variant.startswith("json"):
        path = make_checkpoint("json", tmp_path / "run.json")
        doc = json.loads(path.read_text())
        doc["format"] = 2
        if variant == "json-extra-field":
            doc["labels"] = {"team": "data"}  # a field this version does not know
        else:  # fields renamed and gone
            doc["job_list"] = doc.pop("jobs")
            del doc["next_id"]
        path.write_text(json.dumps(doc))
    elif variant == "journal":
        path = make_checkpoint("journal", tmp_path / "run.journal")
        raw = bytearray(path.read_bytes())
        raw[16:20] = (2).to_bytes(4, "little")  # the header's u32 version
        path.write_bytes(bytes(raw))
    else:
        path = make_checkpoint("sqlite", tmp_path / "run.db")
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
            conn.execute("UPDATE run SET format = 2")
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["json-extra-field", "json-missing-field", "journal", "sqlite"])
def test_a_newer_format_says_so_naming_both_versions(variant: str, tmp_path: Path) -> None:
    path = newer_format(variant, tmp_path)
    before = listing(tmp_path)
    for args in (
        ("status", path),
        ("redrive", path, "--from", FAILED, "--to", "new", "--dry-run"),
        ("redrive", path, "--from", FAILED, "--to", "new"),
    ):
        line = one_line_error(cli(*args), path)
        assert re.search(r"(format|version)\D{0,3}2\b", line), line
        assert re.search(r"(format|version)\D{0,3}1\b", line), line
    path.with_name(path.name + ".lock").unlink(missing_ok=True)  # redrive's lock
    assert listing(tmp_path) == before


# -- mistakes on the command line ------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", FORMATS)
def test_redrive_mistakes_are_one_clear_line(fmt: str, tmp_path: Path) -> None:
    """A state no job is in (a typo, or nothing failed): exit code 1, naming the state
    and the states there are. The same state as --from and --to: exit code 2. Neither
    changes the file."""
    path = make_checkpoint(fmt, tmp_path / checkpoint_name(fmt))
    before = listing(tmp_path)
    for dry in ((), ("--dry-run",)):
        line = one_line_error(
            cli("redrive", path, "--from", "faild", "--to", "new", *dry), "'faild'", code=1
        )
        assert "'failed'" in line and "'done'" in line
        line = one_line_error(cli("redrive", path, "--from", FAILED, "--to", FAILED, *dry), "")
        assert "'failed'" in line
    path.with_name(path.name + ".lock").unlink(missing_ok=True)  # redrive's lock
    assert listing(tmp_path) == before


@pytest.mark.timeout(120)
def test_missing_checkpoint_for_every_command(tmp_path: Path) -> None:
    """No file (or no directory): one line, exit code 2, and nothing created."""
    for path in (tmp_path / "none.json", tmp_path / "no-dir" / "none.db"):
        for args in (
            ("status", path),
            ("status", path, "--json"),
            ("redrive", path, "--from", FAILED, "--to", "new"),
            ("redrive", path, "--from", FAILED, "--to", "new", "--dry-run"),
        ):
            line = one_line_error(cli(*args), path)
            assert "no checkpoint at" in line
    assert os.listdir(tmp_path) == []


# -- output that stays what it claims to be --------------------------------------------


@pytest.mark.timeout(120)
def test_status_json_stays_valid_json(tmp_path: Path) -> None:
    """Strict JSON (no NaN or Infinity, which the journal can hold in a run's report),
    ASCII only, whatever the texts hold."""
    path = tmp_path / "run.journal"
    run: Run[None, JC] = Run("r\u00e9 \x1b[31m", None, JC)
    job_id = run.add_job(JC(n=1), state="st\u00e4te \u2713")
    run.jobs[job_id].state_errors["new"] = ["boom\n\x00 \u2028 \ud7ff \U0001f600"]
    run.report = {"mean_seconds": float("nan"), "peak": float("inf"), "ok": 1.5}
    JournalSerializer(path, job_type=JC).serialize(run)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    result = cli("status", path, "--json", env=locale_env("ascii"))
    assert result.returncode == 0, err(result)
    data = json.loads(result.stdout.decode("ascii"), parse_constant=refuse)
    assert data["name"] == "r\u00e9 \x1b[31m"
    assert data["states"] == {"st\u00e4te \u2713": 1}
    assert data["errors"][0]["texts"] == ["boom\n\x00 \u2028 \ud7ff \U0001f600"]
    assert data["report"] == {"mean_seconds": None, "peak": None, "ok": 1.5}


@pytest.mark.timeout(120)
def test_status_text_escapes_control_characters(tmp_path: Path) -> None:
    """A checkpoint from elsewhere cannot send escape sequences to the terminal or fake
    lines of output: control characters are shown escaped."""
    path = tmp_path / "run.json"
    run: Run[None, JC] = Run("r", None, JC)
    job_id = run.add_job(JC(n=1), state="bad\x1b]0;owned\x07")
    run.jobs[job_id].state_errors["new"] = ["boom\x1b[2J\nFAKE LINE \u202egnp.exe"]
    JsonSerializer(path, job_type=JC).serialize(run)
    result = cli("status", path)
    assert result.returncode == 0, err(result)
    text = out(result)
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f\u202e]", text), repr(text)
    assert not any(line.startswith("FAKE LINE") for line in text.splitlines())
    assert "boom\\x1b[2J\\nFAKE LINE \\u202egnp.exe" in text


@pytest.mark.timeout(120)
def test_status_into_a_closed_pipe(tmp_path: Path) -> None:
    """``status ... | head -0``: the reader is gone; no traceback."""
    path = make_checkpoint("json", tmp_path / "run.json")
    child = subprocess.Popen(
        [sys.executable, "-m", "jorbmp", "status", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # before the child can have written anything
    try:
        stderr = child.stderr.read().decode()
        child.wait(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
