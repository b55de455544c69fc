"""Checkpoint formats: how a Run is written to disk while it executes, and read back."""

from .base import NilSerializer, Serializer
from .journal import JournalSerializer
from .json_serializer import JsonSerializer
from .sqlite import SqliteSerializer

__all__ = ["JournalSerializer", "JsonSerializer", "NilSerializer", "Serializer", "SqliteSerializer"]
