"""Image hashes for deduplication: SHA-256 of the encoded bytes, a 64-bit DCT perceptual hash, and the
bit bands that turn "within k bits" into exact-match joins.

The perceptual hash is imagededup's ``PHash`` (same preprocessing, DCT, threshold and bit order), so
hashes published with that library compare directly. It is stored as a signed 64-bit int because
Delta/Parquet have no unsigned 64-bit type; ``phash_hex`` gives imagededup's string.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIDE = 32  # imagededup resizes to 32x32 before the DCT
_BLOCK = 8  # and keeps the 8x8 lowest frequencies

# Coefficients closer than this count as equal. DCT values of a 32x32 uint8 image reach ~1e6 and a
# float64 matrix product errs by ~1e-10, while scipy's FFT-based DCT returns exact zeros where the
# maths gives zero (flat rows or columns, symmetric gradients). Without the tolerance those ties
# would fall either side of the median by rounding noise alone.
_TIE_TOLERANCE = 1e-6

# Beyond 31 bits two hashes are as far apart as two unrelated images' (32 on average): no
# near-duplicate threshold is that loose, and bands would shrink to 2 bits, matching everything.
MAX_BAND_DISTANCE = 31

_UNSIGNED_MASK = (1 << HASH_BITS) - 1


def image_sha256(data: bytes) -> str:
    """Lowercase hex SHA-256 of the encoded image bytes, as img2dataset's ``sha256`` column."""
    return hashlib.sha256(data).hexdigest()


def phash(image: Image.Image) -> int:
    """imagededup's 64-bit perceptual hash of ``image``, as a signed int64-range int."""
    coefficients = _low_frequencies(_grey_32(image)).ravel()
    # The DC term (overall brightness) takes a bit but not a say in the median.
    median = np.median(coefficients[1:])
    bits = coefficients >= median - _TIE_TOLERANCE
    # Row-major, first coefficient in the most significant bit: imagededup's np.packbits order.
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


def phash_hex(h: int) -> str:
    """The 16-character hex string imagededup gives for the same hash."""
    return format(_check_int64(h) & _UNSIGNED_MASK, "016x")


def phash_from_hex(text: str) -> int:
    """The signed hash of imagededup's 16-character hex string."""
    try:
        data = bytes.fromhex(text)
    except (TypeError, ValueError):
        data = b""
    # bytes.fromhex skips spaces, so a short result also catches "ab cd ..." and other padding.
    if len(text) != HASH_BITS // 4 or len(data) != HASH_BITS // 8:
        raise ValueError(f"a perceptual hash is {HASH_BITS // 4} hex digits, got {text!r}")
    return int.from_bytes(data, "big", signed=True)


def hamming(a, b) -> np.ndarray:
    """Bits that differ between int64 hashes, element-wise with numpy broadcasting (uint8)."""
    differing = np.asarray(np.bitwise_xor(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))
    # As unsigned: numpy counts the bits of a negative int's absolute value, not of its two's complement.
    return np.bitwise_count(differing.view(np.uint64))


def bands(max_distance: int) -> list[tuple[int, int]]:
    """``max_distance + 1`` contiguous (start, stop) bit ranges covering the 64 bits, sizes differing by at most one.

    Hashes within ``max_distance`` bits differ in at most that many bands, so they agree on at least one:
    an exact join per band finds every such pair.
    """
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
        raise TypeError(f"max_distance must be an int, got {type(max_distance).__name__}")
    if not 0 <= max_distance <= MAX_BAND_DISTANCE:
        raise ValueError(f"max_distance must be between 0 and {MAX_BAND_DISTANCE} bits, got {max_distance}")
    count = int(max_distance) + 1
    size, wider = divmod(HASH_BITS, count)
    edges = np.cumsum([0] + [size + 1] * wider + [size] * (count - wider))
    return [(int(start), int(stop)) for start, stop in zip(edges[:-1], edges[1:])]


def band_values(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Each hash's value in each band of ``bands(max_distance)``, shape (n, max_distance + 1), int64."""
    unsigned = np.asarray(hashes, dtype=np.int64).reshape(-1).view(np.uint64)
    columns = [
        (unsigned >> np.uint64(start)) & np.uint64((1 << (stop - start)) - 1) for start, stop in bands(max_distance)
    ]
    # A single 64-bit band holds the whole hash, which only fits int64 as its two's complement.
    return np.stack(columns, axis=1).view(np.int64)


def _grey_32(image: Image.Image) -> np.ndarray:
    """imagededup's ``load_image``: any mode to RGB with alpha dropped (not composited), Lanczos to 32x32, then grey."""
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB")
    small = image.resize((_SIDE, _SIDE), Image.Resampling.LANCZOS).convert("L")
    return np.asarray(small, dtype=np.float64)


def _low_frequencies(grey: np.ndarray) -> np.ndarray:
    """The 8x8 lowest-frequency block of the 2-D DCT-II (scipy.fftpack's unnormalised scale)."""
    basis = _dct_basis()
    return basis @ grey @ basis.T


@lru_cache(maxsize=1)
def _dct_basis() -> np.ndarray:
    """The first 8 rows of the 32-point DCT-II matrix, 2*cos(pi*k*(2n+1)/64), as scipy.fftpack.dct computes."""
    k = np.arange(_BLOCK)[:, None]
    n = np.arange(_SIDE)[None, :]
    basis = 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * _SIDE))
    basis.setflags(write=False)
    return basis


def _check_int64(h: int) -> int:
    if not -(1 << (HASH_BITS - 1)) <= int(h) < (1 << (HASH_BITS - 1)):
        raise ValueError(f"{h} is outside the signed 64-bit range; hashes are stored as int64")
    return int(h)
