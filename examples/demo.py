"""jorbmp demo: generate text files, compress and hash them on every core, then "publish" them.

    split ──kicks one job per file──> generate -> compress -> hash -> publish -> done

generate, compress and hash are CPU-bound process states (one worker per core); publish
is an async state that simulates a rate-limited upload API. The run is checkpointed to
demo-output/demo.jorbmp.json: press Ctrl-C at any time and run the demo again to resume.

    python examples/demo.py [--jobs N] [--fresh]      (or: make demo)

Debug an exec in flight: put breakpoint() in it and run with JORBMP_INLINE=1.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import lzma
import os
import random
import shutil
import sys
import time
from pathlib import Path

import msgspec

from jorbmp import (
    JsonSerializer,
    KickRequest,
    Processor,
    Run,
    RunReport,
    State,
    TqdmStatusListener,
)

OUT = Path("demo-output")
CHECKPOINT = OUT / "demo.jorbmp.json"
REPORT = OUT / "report.html"  # the run report with its timeline, to open in a browser
CORES = os.cpu_count() or 1


class Overall(msgspec.Struct):  # OC: run-wide values, checkpointed with the run
    workdir: str
    files: int
    words_per_file: int


class FileJob(msgspec.Struct):  # JC: one wide record for every state of the workflow
    name: str = ""
    seed: int = 0
    raw_bytes: int = 0
    xz_bytes: int = 0
    sha256: str = ""
    url: str = ""


# Exec functions live at module level: process states pickle them by reference.


def split(ac, oc: Overall, jc: FileJob):
    """Fan out: kick one job per file (ids "0->0", "0->1", ...); this job is finished."""
    kicks = [
        KickRequest(FileJob(name=f"file-{i:04d}.txt", seed=i), "generate") for i in range(oc.files)
    ]
    return jc, "done", kicks


def generate(ac, oc: Overall, jc: FileJob):
    """Write a file of pseudo-random (but compressible) words, deterministic per seed."""
    rng = random.Random(jc.seed)
    vocabulary = ["".join(rng.choices("etaoinshrdlu", k=rng.randint(2, 9))) for _ in range(2000)]
    data = " ".join(rng.choices(vocabulary, k=oc.words_per_file)).encode()
    Path(oc.workdir, jc.name).write_bytes(data)
    jc.raw_bytes = len(data)
    return jc, "compress"


def compress(ac, oc: Overall, jc: FileJob):
    """lzma-compress the file (the expensive step) and record the sizes in the job context."""
    src = Path(oc.workdir, jc.name)
    packed = lzma.compress(src.read_bytes(), preset=6)
    Path(oc.workdir, jc.name + ".xz").write_bytes(packed)
    jc.xz_bytes = len(packed)
    return jc, "hash"


def hash_file(ac, oc: Overall, jc: FileJob):
    jc.sha256 = hashlib.sha256(Path(oc.workdir, jc.name + ".xz").read_bytes()).hexdigest()
    return jc, "publish"


async def publish(ac, oc: Overall, jc: FileJob):
    """Simulated upload. About 1 in 20 calls fails; a raised exception is recorded in
    job.state_errors["publish"] and the job is retried (up to max_retries times)."""
    await asyncio.sleep(0.05)
    if random.random() < 0.05:
        raise ConnectionError(f"upload of {jc.name} reset by peer (simulated)")
    jc.url = f"https://example.invalid/{jc.sha256[:16]}/{jc.name}.xz"
    return jc, "done"


STATES = [
    State("split", split),
    State("generate", generate, concurrency=CORES),
    State("compress", compress, concurrency=CORES),
    State("hash", hash_file, concurrency=CORES),
    # async def -> kind "async"; at most 8 uploads at once, at most 40 started per second.
    State("publish", publish, concurrency=8, rate_limit=40),
    State("done", terminal=True),
    # Not declared: "failed", added automatically as the terminal error_state.
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="files to process (new runs)")
    parser.add_argument("--fresh", action="store_true", help="delete the old run first")
    args = parser.parse_args()

    if args.fresh:
        shutil.rmtree(OUT, ignore_errors=True)
    serializer = JsonSerializer(CHECKPOINT, overall_type=Overall, job_type=FileJob)
    try:
        run = serializer.deserialize()
        print(f"Resuming {CHECKPOINT} ({len(run.jobs)} jobs: {run.counts()})")
    except FileNotFoundError:
        workdir = (OUT / "work").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        overall = Overall(str(workdir), files=args.jobs, words_per_file=20_000)
        run = Run("demo", overall=overall, job_type=FileJob)
        run.add_job(FileJob(), state="split")  # jorb's AddJobWithState
        print(f"New run: {args.jobs} files in {workdir}, {CORES} cores")

    processor = Processor(None, STATES, serializer, TqdmStatusListener())
    started = time.perf_counter()
    try:
        processor.exec(run)  # blocks until every job is in a terminal state
    except KeyboardInterrupt:
        # The library finished the in-flight execs and wrote the checkpoint first.
        print(f"\nInterrupted; progress saved in {CHECKPOINT}: {run.counts()}")
        print("Interrupted runs resume: run `make demo` again (or add --fresh to start over).")
        return 130
    wall = time.perf_counter() - started

    files = [j.context for j in run.jobs.values() if j.context.name]
    raw, packed = sum(f.raw_bytes for f in files), sum(f.xz_bytes for f in files)
    errors = sum(len(e) for j in run.jobs.values() for e in j.state_errors.values())
    print(f"\n{processor.last_report}")  # per-state figures, the bottleneck, a hint
    # The same with charts of the run over time: the checkpoint's report, which is that
    # of the last execution that did something (a finished run re-run executes nothing).
    if run.report is not None:
        report = msgspec.convert(run.report, RunReport)
        REPORT.write_text(report.to_html(), encoding="utf-8")
        print(f"\nReport with charts: {REPORT.resolve()}")
    print(f"\nJobs per state: {run.counts()}")
    print(f"Bytes in: {raw:,}  out (xz): {packed:,}  ratio: {packed / max(raw, 1):.1%}")
    print(f"Errors recorded (then retried): {errors}  wall time: {wall:.1f}s")
    print(f"Checkpoint: {CHECKPOINT}. Run `make demo` again: an interrupted run resumes,")
    print("a complete one finishes at once; `python examples/demo.py --fresh` starts over.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
