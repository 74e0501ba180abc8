"""Registry, type aliases and tensor helpers: the bottom layer, importing nothing of ours."""

from score_sde.utils.io import LogFileHandler, WriteError, atomic_write_bytes, write_error
from score_sde.utils.odeint import bounded_odeint_options
from score_sde.utils.registry import Registry
from score_sde.utils.tensor import append_dims, as_batch_time, batch_mul, sum_except_batch
from score_sde.utils.types import InverseScaler, ScoreFn
from score_sde.utils.version import __version__

__all__ = [
    "Registry",
    "ScoreFn",
    "InverseScaler",
    "append_dims",
    "atomic_write_bytes",
    "WriteError",
    "LogFileHandler",
    "write_error",
    "bounded_odeint_options",
    "as_batch_time",
    "batch_mul",
    "sum_except_batch",
    "__version__",
]
