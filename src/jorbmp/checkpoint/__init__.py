"""Checkpoint formats: how a Run is written to disk while it executes, and read back."""

from pathlib import Path

from .base import NilSerializer, Serializer, format_of
from .journal import JournalSerializer
from .json_serializer import JsonSerializer
from .sqlite import SqliteSerializer

__all__ = [
    "JournalSerializer",
    "JsonSerializer",
    "NilSerializer",
    "Serializer",
    "SqliteSerializer",
    "open_checkpoint",
]


def open_checkpoint(path: "str | Path") -> Serializer:
    """An untyped serializer for the checkpoint at ``path``, whatever its format (told
    by its first bytes; JSON when unsure, whose loader then says what is wrong)."""
    with open(path, "rb") as f:  # FileNotFoundError when there is none
        fmt = format_of(f.read(32))
    if fmt == "sqlite":
        return SqliteSerializer(path)
    if fmt == "journal":
        return JournalSerializer(path)
    return JsonSerializer(path)
