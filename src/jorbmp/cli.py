"""``python -m jorbmp status|redrive``: inspect and patch checkpoints from the shell.

Both commands read checkpoints without the user's Python types (contexts decode as
plain JSON-like data), so they work on any run, and loading one never runs code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from .checkpoint import open_checkpoint
from .errors import CheckpointError
from .report import RunReport


def _print_summary(path: Path, summary: dict[str, Any]) -> None:
    print(f"run {summary['name']!r} in {path}: {summary['jobs']} jobs")
    width = max((len(s) for s in summary["states"]), default=5)
    for state, n in summary["states"].items():
        print(f"  {state.ljust(width)}  {n}")
    if summary["errors"]:
        print("most common errors:")
        for e in summary["errors"]:
            examples = ", ".join(e["examples"])
            print(f"  {e['jobs']:>6} jobs  in {e['state']!r}: {e['error']}  (e.g. {examples})")
    if summary["report"] is not None:
        print("latest execution:")
        try:
            report = msgspec.convert(summary["report"], RunReport)
        except msgspec.ValidationError:
            print("  (a report this version cannot read)")
        else:
            print("  " + str(report).replace("\n", "\n  "))


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    summary = msgspec.to_builtins(open_checkpoint(path).overview())
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    else:
        _print_summary(path, summary)
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    serializer = open_checkpoint(path)
    # Read and write under one hold of the lock (refused while a processor executes
    # this checkpoint), so that no processor starts in between.
    with serializer.locked():
        run = serializer.deserialize()
        moved = run.redrive(args.from_state, args.to_state, args.error_contains)
        if moved and not args.dry_run:
            serializer.serialize(run)
    verb = "would move" if args.dry_run else "moved"
    print(f"{verb} {len(moved)} jobs from {args.from_state!r} to {args.to_state!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jorbmp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="per-state counts and the most common errors")
    status.add_argument("checkpoint")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(fn=cmd_status)
    redrive = sub.add_parser("redrive", help="move jobs from one state to another")
    redrive.add_argument("checkpoint")
    redrive.add_argument("--from", dest="from_state", required=True, metavar="STATE")
    redrive.add_argument("--to", dest="to_state", required=True, metavar="STATE")
    redrive.add_argument("--error-contains", metavar="TEXT", help="only jobs with such an error")
    redrive.add_argument("--dry-run", action="store_true", help="count, change nothing")
    redrive.set_defaults(fn=cmd_redrive)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except FileNotFoundError as exc:
        print(f"jorbmp: no checkpoint at {exc.filename or args.checkpoint}", file=sys.stderr)
    except CheckpointError as exc:
        print(f"jorbmp: {exc}", file=sys.stderr)
    return 2
