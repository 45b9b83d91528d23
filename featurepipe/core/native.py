"""The compiled kernels of ``_native.c``, or None where featurepipe was installed without a C
compiler (``setup.py`` then skips the extension and callers take their NumPy paths).

:class:`NativeKernels` is what callers rely on; each keeps :data:`kernels` in a module-level
``compiled`` that is None-checked before use (tests set it to None to run the fallbacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class NativeKernels(Protocol):
    """The functions of ``featurepipe.core._native``. Array arguments are C-contiguous
    NumPy arrays of the element type named."""

    def scalar_values(self, tag: int, kind: int, values: np.ndarray, valid: np.ndarray | None, /
                      ) -> tuple[bytes, bytes]:
        """Serialized Feast ``Value`` protos of a numeric column (kind 0: float64, 1: float32,
        2: int64; ``valid``: uint8, 0 for null), as a padded row matrix and int64 row lengths."""
        ...

    def timestamps(self, micros: np.ndarray, /) -> tuple[bytes, bytes]:
        """Serialized protobuf Timestamps of int64 epoch microseconds (row matrix, int64 lengths)."""
        ...

    def restore_commands(self, keys: np.ndarray, key_lengths: np.ndarray, fields: Sequence[bytes],
                         values: Sequence[tuple[np.ndarray, np.ndarray]], ttl: bytes, /) -> bytes:
        """RESP ``RESTORE`` commands of whole hashes, one per key row (uint8 key matrix and int64
        key lengths; per field, a uint8 value matrix and int64 value lengths)."""
        ...

    def schedules(self, v: np.ndarray, row_groups: np.ndarray, columns: Sequence[np.ndarray], kinds: bytes,
                  offsets: np.ndarray, head: bytes, /) -> tuple[bytes, bytes]:
        """Window schedules, one per entity (rows ``offsets[e]:offsets[e + 1]`` of int64 ``v``,
        of int64 ``row_groups`` and of each 8-byte column, ``kinds`` b"i"/b"f" per column;
        ``head`` the schedule's header and column groups), as a padded row matrix and int64
        row lengths."""
        ...

    def crc64(self, data: bytes, /) -> int:
        """CRC-64/Redis of a bytes-like object."""
        ...

    def asof_rows(self, keys: np.ndarray, starts: np.ndarray, ts: np.ndarray, qkeys: np.ndarray,
                  known: np.ndarray, qts: np.ndarray, ttl: int, out: np.ndarray, /) -> None:
        """The offline index's point-in-time lookup: each query's row, or -1, into ``out``."""
        ...


try:
    from featurepipe.core import _native
except ImportError:  # not compiled (no C compiler at install time)
    kernels: NativeKernels | None = None
else:
    kernels = _native
