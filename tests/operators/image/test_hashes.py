"""Image hashes without Ray: SHA-256, imagededup's pHash, Hamming distance and the bit bands."""

from __future__ import annotations

import hashlib
import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy.fftpack import dct

from operators.image.hashes import (
    MAX_BAND_DISTANCE,
    band_values,
    bands,
    hamming,
    image_sha256,
    phash,
    phash_from_hex,
    phash_hex,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def imagededup_phash_hex(image: Image.Image) -> str:
    """imagededup's ``PHash().encode_image`` re-derived step by step around the DCT it calls (scipy.fftpack).

    imagededup itself cannot be imported here: ``imagededup.methods.hashing`` pulls in its CNN module
    (torch, torchvision), matplotlib and scikit-learn through its package imports.
    """
    if image.mode != "RGB":  # load_image: alpha is dropped, not composited
        image = image.convert("RGBA").convert("RGB")
    grey = np.array(image.resize((32, 32), Image.LANCZOS).convert("L")).astype("uint8")
    block = dct(dct(grey, axis=0), axis=1)[:8, :8]
    bits = block >= np.median(block.flatten()[1:])
    return "".join(f"{byte:02x}" for byte in np.packbits(bits))


def formula_images() -> dict[str, Image.Image]:
    """Images from integer formulas and drawing calls only, so they are the same on every machine and numpy."""
    y, x = np.mgrid[0:120, 0:160]
    canvas = Image.new("RGB", (200, 150), (30, 60, 90))
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((20, 30, 120, 110), fill=(220, 180, 40))
    draw.rectangle((110, 20, 180, 90), fill=(200, 30, 60))
    draw.polygon([(40, 140), (100, 90), (190, 145)], fill=(20, 200, 120))
    return {
        "solid": Image.new("RGB", (64, 48), (10, 200, 30)),
        "horizontal_gradient": Image.fromarray((x * 255 // 159).astype(np.uint8)),
        "vertical_gradient": Image.fromarray((y * 255 // 119).astype(np.uint8)).convert("RGB"),
        "diagonal_gradient": Image.fromarray(((x + y) * 255 // 278).astype(np.uint8)),
        "moire": Image.fromarray(((x * x + 3 * y * y + x * y) % 256).astype(np.uint8)),
        "shapes": canvas,
        "shapes_blurred": canvas.filter(ImageFilter.GaussianBlur(3)),
    }


def varied_images() -> dict[str, Image.Image]:
    """Photo-like noise, odd sizes and every mode imagededup converts, on top of the formula images."""
    rng = np.random.default_rng(11)
    images = dict(formula_images())
    for i in range(8):  # smooth random fields: what photographs look like at 32x32
        small = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        size = (int(rng.integers(40, 400)), int(rng.integers(40, 400)))
        images[f"smooth_noise_{i}"] = Image.fromarray(small).resize(size, Image.BICUBIC)
    for size in ((1, 1), (2, 3), (33, 47), (500, 17), (3, 400), (31, 32), (1024, 768)):
        images[f"noise_{size[0]}x{size[1]}"] = Image.fromarray(
            rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        )
    photo = images["smooth_noise_0"]
    images.update(
        {
            "rgba_random_alpha": Image.fromarray(
                np.dstack([np.asarray(photo), rng.integers(0, 256, photo.size[::-1])]).astype(np.uint8), "RGBA"
            ),
            "la": photo.convert("LA"),
            "grey": photo.convert("L"),
            "palette": photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
            "bilevel": photo.convert("1"),
            "cmyk": photo.convert("CMYK"),
            "shapes_jpeg": Image.open(io.BytesIO(_jpeg(images["shapes"], 75))),
            "grey_16bit": Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 200),
        }
    )
    return images


# imagededup 0.3.3.post2's own ``PHash().encode_image(image_file=...)`` on formula_images() saved as PNG, computed
# once with its real hashing.py and image_utils.py (their package imports of torch, sklearn and matplotlib stubbed).
IMAGEDEDUP_PHASHES = {
    "solid": "ffffffffffffffff",
    "horizontal_gradient": "aaffffffffffffff",
    "vertical_gradient": "ff7fff7f7f7f7f7f",
    "diagonal_gradient": "aa7dee7dfa75ae7f",
    "moire": "a81bcc33dc728adb",
    "shapes": "c4603f7bf0d869c6",
    "shapes_blurred": "c4603f7bf0d869c6",
}


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def test_sha256_is_the_hex_digest_of_the_encoded_bytes():
    assert image_sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    jpeg = _jpeg(formula_images()["shapes"], 90)
    assert image_sha256(jpeg) == hashlib.sha256(jpeg).hexdigest()
    assert image_sha256(b"") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("name", sorted(IMAGEDEDUP_PHASHES))
def test_phash_equals_the_hashes_imagededup_computed(name):
    assert phash_hex(phash(formula_images()[name])) == IMAGEDEDUP_PHASHES[name]


@pytest.mark.parametrize("name", sorted(varied_images()))
def test_phash_equals_imagededups_algorithm_on_varied_images(name):
    image = varied_images()[name]
    assert phash_hex(phash(image)) == imagededup_phash_hex(image)


def test_phash_is_a_signed_int64_and_round_trips_through_imagededups_hex():
    for image in varied_images().values():
        h = phash(image)
        assert isinstance(h, int) and INT64_MIN <= h <= INT64_MAX
        assert phash_from_hex(phash_hex(h)) == h
    # The DC term is the image's brightness, almost always above the median: the top bit is set, the int negative.
    assert phash(formula_images()["shapes"]) < 0


def test_hex_conversion_at_the_edges_of_the_range():
    cases = {
        0: "0000000000000000",
        1: "0000000000000001",
        -1: "ffffffffffffffff",
        INT64_MAX: "7fffffffffffffff",
        INT64_MIN: "8000000000000000",
    }
    for h, text in cases.items():
        assert phash_hex(h) == text
        assert phash_from_hex(text) == h
        assert phash_from_hex(text.upper()) == h
    with pytest.raises(ValueError):
        phash_hex(2**63)  # an unsigned hash must be converted, not silently stored


@pytest.mark.parametrize(
    "text",
    ["", "abc", "0x12345678901234", "12 34 56 78 9a bc", "g" * 16, "1" * 17, "+123456789abcdef", "-000000000000001"],
)
def test_malformed_hex_is_refused(text):
    with pytest.raises(ValueError):
        phash_from_hex(text)


def test_hamming_counts_differing_bits_like_python():
    rng = np.random.default_rng(3)
    a = rng.integers(INT64_MIN, INT64_MAX, 500, dtype=np.int64, endpoint=True)
    b = rng.integers(INT64_MIN, INT64_MAX, 500, dtype=np.int64, endpoint=True)
    expected = [bin((int(x) ^ int(y)) & (2**64 - 1)).count("1") for x, y in zip(a, b)]
    assert hamming(a, b).tolist() == expected
    assert int(hamming(-1, 0)) == 64 and int(hamming(INT64_MIN, INT64_MAX)) == 64 and int(hamming(5, 5)) == 0


def test_hamming_broadcasts_to_a_distance_matrix():
    rng = np.random.default_rng(4)
    a = rng.integers(INT64_MIN, INT64_MAX, 7, dtype=np.int64)
    b = rng.integers(INT64_MIN, INT64_MAX, 5, dtype=np.int64)
    matrix = hamming(a[:, None], b[None, :])
    assert matrix.shape == (7, 5)
    assert all(
        matrix[i, j] == bin((int(a[i]) ^ int(b[j])) & (2**64 - 1)).count("1")
        for i, j in itertools.product(range(7), range(5))
    )
    assert hamming(a, [int(b[0])] * 7).tolist() == matrix[:, 0].tolist()  # plain ints and lists work too


@pytest.mark.parametrize("max_distance", [0, 1, 3, 7, 10, 15, 31])
def test_bands_cover_the_64_bits_in_near_equal_contiguous_ranges(max_distance):
    ranges = bands(max_distance)
    assert len(ranges) == max_distance + 1
    assert ranges[0][0] == 0 and ranges[-1][1] == 64
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(ranges, ranges[1:]))
    sizes = {stop - start for start, stop in ranges}
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 2


@pytest.mark.parametrize("bad", [-1, MAX_BAND_DISTANCE + 1, 64])
def test_bands_refuse_distances_out_of_range(bad):
    with pytest.raises(ValueError, match="max_distance"):
        bands(bad)


@pytest.mark.parametrize("bad", [2.0, "3", True])
def test_bands_refuse_non_integers(bad):
    with pytest.raises(TypeError):
        bands(bad)


def test_band_values_are_the_hash_bits_of_each_band():
    rng = np.random.default_rng(5)
    hashes = np.concatenate(
        [rng.integers(INT64_MIN, INT64_MAX, 50, dtype=np.int64), np.array([0, -1, INT64_MIN, INT64_MAX], np.int64)]
    )
    for max_distance in (0, 4, 9):
        values = band_values(hashes, max_distance)
        assert values.shape == (len(hashes), max_distance + 1) and values.dtype == np.int64
        for h, row in zip(hashes, values):
            unsigned = int(h) & (2**64 - 1)
            expected = [(unsigned >> start) & ((1 << (stop - start)) - 1) for start, stop in bands(max_distance)]
            assert [int(v) & (2**64 - 1) for v in row] == expected
    assert band_values(hashes, 0)[:, 0].tolist() == hashes.tolist()  # one band: the hash itself


def planted_hashes(max_distance: int, rng: np.random.Generator, n_random: int = 1500, n_pairs: int = 400) -> np.ndarray:
    """Random hashes plus pairs planted at every distance from 0 to max_distance + 2."""
    base = rng.integers(INT64_MIN, INT64_MAX, n_random + n_pairs, dtype=np.int64, endpoint=True)
    partners = []
    for i in range(n_pairs):
        flips = rng.choice(64, size=int(rng.integers(0, max_distance + 3)), replace=False)
        mask = sum(1 << int(bit) for bit in flips)
        partners.append(np.array([(int(base[n_random + i]) & (2**64 - 1)) ^ mask], np.uint64).view(np.int64)[0])
    return np.concatenate([base, np.array(partners, np.int64)])


@pytest.mark.parametrize("max_distance", [0, 1, 2, 5, 8, 10, 16, 31])
def test_pairs_sharing_a_band_include_every_pair_within_the_distance(max_distance):
    hashes = planted_hashes(max_distance, np.random.default_rng(max_distance))
    within = hamming(hashes[:, None], hashes[None, :]) <= max_distance
    values = band_values(hashes, max_distance)
    share_a_band = np.zeros_like(within)
    for column in values.T:
        share_a_band |= column[:, None] == column[None, :]
    assert within.sum() > len(hashes) + 100  # the planted pairs are there, not only the diagonal
    assert not (within & ~share_a_band).any()


@pytest.mark.parametrize("max_distance", [0, 3, 10, 31])
def test_one_more_bit_than_the_distance_can_miss_every_band(max_distance):
    """The band count is the least that works: flipping one bit in every band leaves no band equal."""
    h = np.array([0x0123456789ABCDEF], np.int64)
    flipped = int(h[0])
    for start, _ in bands(max_distance):
        flipped ^= 1 << start
    other = np.array([flipped], np.uint64 if flipped >= 2**63 else np.int64).view(np.int64)
    assert int(hamming(h, other)[0]) == max_distance + 1
    assert not (band_values(h, max_distance) == band_values(other, max_distance)).any()
