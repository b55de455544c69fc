"""jorbmp: concentrated computing. Resumable, multi-step batch workflows on one big machine.

The public API is everything in ``__all__``; modules starting with ``_`` are internal.
"""

import logging

from .adaptive import AdaptiveConcurrency
from .backoff import Backoff
from .checkpoint import (
    JournalSerializer,
    JsonSerializer,
    NilSerializer,
    Serializer,
    SqliteSerializer,
)
from .dask import DaskBackend
from .errors import CheckpointError, RateLimitError, Stopped
from .processor import Processor
from .progress import TqdmStatusListener
from .ratelimit import AIMDRateLimiter
from .report import RunReport, StateReport
from .run import FAILED, NEW, Job, Run
from .state import KickRequest, State
from .status import NilStatusListener, StatusCount, StatusListener

logging.getLogger("jorbmp").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "FAILED",
    "NEW",
    "AIMDRateLimiter",
    "AdaptiveConcurrency",
    "Backoff",
    "CheckpointError",
    "DaskBackend",
    "Job",
    "JournalSerializer",
    "JsonSerializer",
    "KickRequest",
    "NilSerializer",
    "NilStatusListener",
    "Processor",
    "RateLimitError",
    "Run",
    "RunReport",
    "Serializer",
    "SqliteSerializer",
    "State",
    "StateReport",
    "StatusCount",
    "StatusListener",
    "Stopped",
    "TqdmStatusListener",
]
