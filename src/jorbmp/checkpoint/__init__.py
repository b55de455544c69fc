"""Checkpoint formats: how a Run is written to disk while it executes, and read back."""

from .base import NilSerializer, Serializer
from .json_serializer import JsonSerializer

__all__ = ["JsonSerializer", "NilSerializer", "Serializer"]
