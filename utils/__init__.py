"""Registry, type aliases and tensor helpers: the bottom layer, importing nothing of ours."""

from utils.io import WriteError, atomic_write_bytes, write_error
from utils.odeint import bounded_odeint_options
from utils.registry import Registry
from utils.tensor import append_dims, as_batch_time, batch_mul, sum_except_batch
from utils.types import InverseScaler, ScoreFn
from utils.version import __version__

__all__ = [
    "Registry",
    "ScoreFn",
    "InverseScaler",
    "append_dims",
    "atomic_write_bytes",
    "WriteError",
    "write_error",
    "bounded_odeint_options",
    "as_batch_time",
    "batch_mul",
    "sum_except_batch",
    "__version__",
]
