"""Reader for the IDX format of the MNIST family (raw or gzip).

The format: 2 zero bytes, a dtype code, the number of dimensions, then one big-endian uint32
per dimension and the data. We validate every part, so a truncated or corrupted file is an
error naming the file rather than a silently short dataset.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from batchlab.errors import DataError

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


MAX_IDX_BYTES = 1 << 30
"""Largest IDX payload accepted (the whole MNIST training set is 47 MB). A header declaring
more is refused before its data is decompressed, so a gzip bomb costs nothing."""


def _declared_size(head: bytes) -> int | None:
    """Total bytes (header + data) an IDX header declares, None if `head` is not one."""
    if len(head) < 4 or head[0] or head[1] or head[2] not in _DTYPES or not 0 < head[3] <= 4:
        return None
    n = 4 + 4 * head[3]
    if len(head) < n:
        return None
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(head[3])]
    return n + int(np.prod(dims, dtype=object)) * _DTYPES[head[2]].itemsize


def _refuse_special(path: Path) -> None:
    """A dataset file must be a regular file (after symlinks): reading a FIFO waits forever
    and a device such as /dev/zero never ends."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file")
        raise DataError(f"{path} is {kind}, not a data file")


def read_bytes(path: Path, limit: int = MAX_IDX_BYTES) -> bytes:
    """Whole file content, gunzipped when the name ends in .gz (a broken gzip is a DataError).

    Decompression streams: the IDX header comes first, and if it declares more than `limit`
    bytes the file is refused before the rest is inflated; at most declared + 1 bytes are ever
    decompressed (one more, to notice trailing data)."""
    path = Path(path)
    _refuse_special(path)
    if path.suffix != ".gz":
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(20)
            declared = _declared_size(head)
            if declared is not None and declared - 4 > limit:
                raise DataError(f"{path}: the IDX header declares {declared:,} bytes, more than "
                                f"the {limit:,} a dataset file may hold (corrupt or hostile file)")
            if declared is None:  # not an IDX header: parse_idx names what is wrong
                return head
            return head + f.read(max(declared + 1 - len(head), 0))
    except OSError as e:
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            raise DataError(f"cannot read {path}: {e.strerror}") from None
        raise DataError(f"{path} is not a valid gzip file (truncated or corrupt): {e}") from None
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a valid gzip file (truncated or corrupt): {e}") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array, validating magic number, dimensions and length."""
    if len(data) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"{name}: bad IDX magic number (first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise DataError(f"{name}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0 or ndim > 4:
        raise DataError(f"{name}: implausible IDX dimension count {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{name}: IDX file {what}: header says {dims} ({expected} data bytes), found {actual}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: Path) -> np.ndarray:
    """Read and validate one IDX file (raw or .gz)."""
    return parse_idx(read_bytes(path), name=str(path))


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write an array as IDX (gzip if the name ends in .gz). Used by tests and tools."""
    codes = {v: k for k, v in _DTYPES.items()}
    dt = np.dtype(arr.dtype).newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    code = codes[np.dtype(dt)]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=dt).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
