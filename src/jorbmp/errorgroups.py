"""Errors grouped by kind: a fingerprint of an error text, and the groups of jobs that
recorded errors with one fingerprint.

Error texts that differ only in what varies from job to job (numbers, hex ids, quoted
strings, file paths, URLs) have one fingerprint, so that ``python -m jorbmp status`` and
the HTML report show a thousand ``upload of file-0003.txt reset by peer`` errors as one
kind, ``upload of <path> reset by peer``, with a count and raw examples. The words of a
message stay, and so do numbers inside words (``sha256``, ``v2``, ``E12``).

Pure: this module knows text and job ids only, no run, engine or checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import msgspec

__all__ = [
    "EXAMPLE_CHARS",
    "EXAMPLE_IDS",
    "EXAMPLE_TEXTS",
    "FINGERPRINT_CHARS",
    "SCANNED_CHARS",
    "ErrorGroup",
    "ErrorGrouper",
    "fingerprint",
    "group_errors",
    "jobs_text",
    "text_lines",
]

# Example job ids a group keeps (the first, in the order jobs are added).
EXAMPLE_IDS = 5
# Distinct raw texts a group keeps as examples: enough to see what varies.
EXAMPLE_TEXTS = 3
# A fingerprint longer than this is cut (ending in "..."): a kind is told by its start,
# and a group's key stays small however long its texts (a payload, a traceback).
FINGERPRINT_CHARS = 500
# A text longer than this is fingerprinted on its first part only, so that the work per
# text is bounded (a megabyte-long payload costs what 64 KB cost). The cut changes no
# group in practice: the fingerprint of the first part already fills `FINGERPRINT_CHARS`
# unless that part is nearly all one token (see `fingerprint`).
SCANNED_CHARS = 64 * 1024
# An example text longer than this is kept cut (ending in "..."): a group keeps a few,
# and 100k kinds of megabyte-long errors must not keep 100k megabytes.
EXAMPLE_CHARS = 4000
# Distinct texts whose fingerprints a grouper remembers: runs repeat their texts, but a
# run of 100k different ones must not keep them all alive (a streamed read drops them).
CACHED_TEXTS = 10_000

# Characters of a path segment (no separators, blanks, quotes or brackets).
_SEG = r"[\w.~+@%=-]"
# Common file extensions: a bare name ending in one is a file name (``file-0003.txt``),
# where a dotted name in general is not (``requests.exceptions``, ``example.invalid``).
_EXT = (
    r"(?:txt|csv|tsv|json|jsonl|ndjson|xml|html?|ya?ml|toml|ini|cfg|conf|log|md|rst|"
    r"py|pyc|so|dll|exe|sh|bat|c|h|cpp|rs|go|js|ts|java|"
    r"dat|bin|db|sqlite3?|parquet|arrow|feather|avro|orc|h5|hdf5|npy|npz|pkl|pickle|"
    r"gz|bz2|xz|zst|lz4|zip|tar|tgz|7z|rar|"
    r"jpe?g|png|gif|bmp|tiff?|webp|svg|pdf|docx?|xlsx?|pptx?|"
    r"wav|mp3|flac|ogg|mp4|mkv|avi|mov|webm|"
    r"fastq|fq|fasta|fa|bam|sam|vcf|bed|"
    r"tmp|bak|part|lock|journal)"
)
# One pass over the text, trying at each position, in this order: a quoted string, a
# URL, a path (Windows, UNC, POSIX, or a bare file name), an ISO date and time, a UUID,
# a hex id, a number.
# Every alternative starts only where a token starts (a look-behind refuses the middle
# of a word) and none nests ambiguous repeats, so the pass is linear in the text: no
# catastrophic backtracking on hostile or megabyte-long texts (see the tests).
# The bare file name scans a run of path characters (``_SEG*``) to its end, then back to
# its last ``.ext``. Were it let start after each ``@ % + = ~`` inside a run, as before,
# ``a@b.a@b.`` or ``%00%01`` would rescan to the run's end from each: quadratic. So it
# starts where a run starts, and that finds every name a start inside the run would
# (``_SEG*`` takes the characters before; a run it fails on from its start has none).
# Inside a run (only after a time or number that ended there, as in
# ``2026-12-01 10:10@f.txt``) it starts after ``@ % + = ~`` and scans only to the next.
_PATTERN = re.compile(
    rf"""
    (?P<str> (?<!\w)'[^'\n]*'(?!\w) | (?<!\w)"[^"\n]*"(?!\w) )
  | (?P<url> (?<![\w+.-])[A-Za-z][A-Za-z0-9+.-]{{0,15}}://[^\s'"<>]+ )
  | (?P<path>
        (?<!\w)[A-Za-z]:(?:[\\/]{_SEG}*)+
      | \\\\{_SEG}+(?:\\{_SEG}*)+
      | (?<![\w/.~-])(?:~|\.\.?)?(?:/{_SEG}+)+/?
      | (?<!{_SEG}){_SEG}*\w\.{_EXT}(?:\.{_EXT})?(?![\w-])
      | (?<=[~+@%=])[\w.-]*\w\.{_EXT}(?:\.{_EXT})?(?![\w-])
    )
  | (?P<time>
        (?<!\w)[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}[T\x20][0-9]{{2}}:[0-9]{{2}}
        (?::[0-9]{{2}}(?:[.,][0-9]+)?)?(?:Z|[+-][0-9]{{2}}:?[0-9]{{2}})?(?![\w:])
    )
  | (?P<hex>
        (?<!\w)[0-9a-fA-F]{{8}}(?:-[0-9a-fA-F]{{4}}){{3}}-[0-9a-fA-F]{{12}}(?!\w)
      | (?<!\w)0[xX][0-9a-fA-F]+(?!\w)
      | (?<!\w)(?=[0-9a-fA-F]*[0-9])(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{{8,}}(?!\w)
    )
  | (?P<n> (?<![^\W_])(?<![^\W_]\.)[0-9]+(?:[.,][0-9]+)* )
    """,
    re.VERBOSE | re.IGNORECASE,
)
_PLACEHOLDER = {
    "str": "<str>",
    "url": "<url>",
    "path": "<path>",
    "time": "<time>",
    "hex": "<hex>",
    "n": "<n>",
}


def _placeholder(match: re.Match[str]) -> str:
    return _PLACEHOLDER[match.lastgroup or "n"]


def fingerprint(text: str) -> str:
    """``text`` with what varies between jobs replaced by placeholders: quoted strings
    (``<str>``), URLs (``<url>``), file paths and names (``<path>``), ISO times
    (``<time>``), UUIDs and hex ids (``<hex>``), numbers not inside a word (``<n>``).
    Blanks are collapsed; a long result is cut at `FINGERPRINT_CHARS`.

    Linear in the length of ``text``, and bounded: a text longer than `SCANNED_CHARS`
    is fingerprinted on its first `SCANNED_CHARS` characters. That keeps its group:
    a fingerprint is told by its first `FINGERPRINT_CHARS` characters, which the first
    64 KB of any text made of words already fill. Only a text whose first 64 KB are
    nearly all one token (a quoted payload, a blank run) loses what follows it there:
    a quote still open at the cut is kept as text, not ``<str>``; a URL, path, hex id
    or number cut there is still one placeholder."""
    if len(text) > SCANNED_CHARS:
        text = text[:SCANNED_CHARS]
    normal = " ".join(_PATTERN.sub(_placeholder, text).split())
    if len(normal) > FINGERPRINT_CHARS:
        return normal[: FINGERPRINT_CHARS - 3] + "..."
    return normal


class ErrorGroup(msgspec.Struct):
    """The jobs that recorded errors of one kind (one fingerprint); each job counts once.

    ``states``: jobs per state the error was recorded in. ``current``: of the jobs, those
    still in a state where they recorded it (the error is about where they are now);
    ``moved``: where the others are now, jobs per state: they have left the state that
    failed (retried and went on, or were parked in an error state)."""

    fingerprint: str
    jobs: int
    states: dict[str, int]
    current: int
    moved: dict[str, int]
    examples: list[str]  # the first job ids, in the order they were added
    texts: list[str]  # the first distinct raw texts


class _Tally:
    """A group while it is counted (`ErrorGroup` once built)."""

    __slots__ = ("current", "examples", "jobs", "moved", "states", "texts")

    def __init__(self) -> None:
        self.jobs = 0
        self.current = 0
        self.states: dict[str, int] = {}
        self.moved: dict[str, int] = {}
        self.examples: list[str] = []
        self.texts: list[str] = []


class ErrorGrouper:
    """Groups the errors of jobs added one at a time. Memory grows with the number of
    kinds, not of jobs: per kind, counts and a few examples. Fingerprints are cached
    per distinct text (runs repeat their texts)."""

    def __init__(self) -> None:
        self._tallies: dict[str, _Tally] = {}
        self._prints: dict[str, str] = {}

    def add(self, job_id: str, job_state: str, errors: Mapping[str, list[str]]) -> None:
        """Count one job, now in ``job_state``, with its errors recorded per state."""
        prints, tallies = self._prints, self._tallies
        kinds: dict[str, set[str]] = {}  # this job's fingerprints -> states recording them
        for state, texts in errors.items():
            for text in texts:
                key = prints.get(text)
                if key is None:
                    key = fingerprint(text)
                    if len(prints) < CACHED_TEXTS:
                        prints[text] = key
                kinds.setdefault(key, set()).add(state)
                tally = tallies.get(key)
                if tally is None:
                    tally = tallies[key] = _Tally()
                if len(tally.texts) < EXAMPLE_TEXTS:
                    example = _cut(text, EXAMPLE_CHARS)  # (the text itself when short)
                    if example not in tally.texts:
                        tally.texts.append(example)
        for key, states in kinds.items():
            tally = tallies[key]
            tally.jobs += 1
            if len(tally.examples) < EXAMPLE_IDS:
                tally.examples.append(job_id)
            for state in states:
                tally.states[state] = tally.states.get(state, 0) + 1
            if job_state in states:
                tally.current += 1
            else:
                tally.moved[job_state] = tally.moved.get(job_state, 0) + 1

    def kinds(self) -> int:
        """How many kinds of error were seen."""
        return len(self._tallies)

    def groups(self, top: int | None = None) -> list[ErrorGroup]:
        """The groups, most jobs first (ties by fingerprint); the first ``top`` only, if
        given (a run with 100k kinds of error shows its biggest)."""
        ranked = sorted(self._tallies.items(), key=lambda kv: (-kv[1].jobs, kv[0]))
        if top is not None:
            ranked = ranked[:top]
        return [
            ErrorGroup(
                fingerprint=key,
                jobs=t.jobs,
                states=dict(sorted(t.states.items(), key=lambda kv: (-kv[1], kv[0]))),
                current=t.current,
                moved=dict(sorted(t.moved.items(), key=lambda kv: (-kv[1], kv[0]))),
                examples=list(t.examples),
                texts=list(t.texts),
            )
            for key, t in ranked
        ]


def group_errors(
    jobs: Iterable[tuple[str, str, Mapping[str, list[str]]]], top: int | None = None
) -> list[ErrorGroup]:
    """The error groups of ``(job id, job state, errors per state)`` triples (see
    `ErrorGrouper.groups`)."""
    grouper = ErrorGrouper()
    for job_id, state, errors in jobs:
        if errors:
            grouper.add(job_id, state, errors)
    return grouper.groups(top)


# A raw example text longer than this is cut where `text_lines` shows it.
SHOWN_TEXT_CHARS = 300


def jobs_text(n: int) -> str:
    """``1 job``, ``2 jobs``."""
    return f"{n} job" if n == 1 else f"{n} jobs"


def _states_text(counts: Mapping[str, int], clean: Callable[[str], str]) -> str:
    return ", ".join(f"{clean(repr(s))} {n}" for s, n in counts.items())


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def text_lines(
    groups: list[ErrorGroup], kinds: int, clean: Callable[[str], str] = str
) -> list[str]:
    """The groups as ``status`` prints them: per kind its jobs and fingerprint, the
    states that recorded it, whether those jobs are still there or have left (an old,
    resolved error, or one that parked the job elsewhere), example ids and raw texts.
    ``clean`` makes a text from a checkpoint safe for a terminal."""
    shown = (
        f"the {len(groups)} biggest of {kinds} kinds"
        if kinds > len(groups)
        else ("1 kind" if kinds == 1 else f"{kinds} kinds")
    )
    lines = [f"errors by kind ({shown}):"]
    for g in groups:
        lines.append(f"  {jobs_text(g.jobs):>10}  {clean(g.fingerprint) or '(an empty text)'}")
        where = (
            _states_text(g.states, clean)
            if len(g.states) > 1
            else clean(repr(next(iter(g.states), "")))
        )
        left = g.jobs - g.current
        moved = f"(now {_states_text(g.moved, clean)})"
        if not left:
            fate = f"all {g.jobs} still there" if g.jobs > 1 else "still there"
        elif not g.current:
            fate = (
                f"old: {'all ' if left > 1 else ''}{jobs_text(left)} left that state since {moved}"
            )
        else:
            fate = f"{g.current} still there, {left} left it since {moved}"
        lines.append(f"{'':14}recorded in {where}; {fate}")
        lines.append(f"{'':14}e.g. jobs {', '.join(clean(i) for i in g.examples)}")
        lines += [f"{'':14}{clean(repr(_cut(t, SHOWN_TEXT_CHARS)))}" for t in g.texts]
    return lines
