"""Reader for the IDX format of the MNIST family (raw or gzip).

The format: 2 zero bytes, a dtype code, the number of dimensions, then one big-endian uint32
per dimension and the data. We validate every part, so a truncated or corrupted file is an
error naming the file rather than a silently short dataset.
"""

from __future__ import annotations

import gzip
import hashlib
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


def read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when the name ends in .gz (a broken gzip is a DataError)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is not a valid gzip file (truncated or corrupt): {e}") from None
    return raw


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
