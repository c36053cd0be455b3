"""The IDX reader and the preprocessing in lenet5_ref, against hand-made files and the
numbers of the real MNIST test set. The broken-file cases mirror data/mod.rs's unit tests."""

import gzip

import numpy as np
import pytest
import torch

from conftest import L


def idx(magic: int, dims, data: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(data)


def write_split(folder, n=3, labels=None, rows=28, gz=False, prefix="t10k"):
    """A tiny IDX split in `folder`: image i has every pixel equal to i."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.repeat(np.arange(n, dtype=np.uint8), rows * 28)
    images = idx(L.IMAGES_MAGIC, [n, rows, 28], pixels.tobytes())
    labels = idx(L.LABELS_MAGIC, [len(labels or range(n))], bytes(labels or range(n)))
    for name, data in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def test_parses_a_valid_file():
    got = L.parse_idx(idx(L.IMAGES_MAGIC, [2, 1, 3], [1, 2, 3, 4, 5, 6]), L.IMAGES_MAGIC, "x")
    assert got.shape == (2, 1, 3) and got.dtype == np.uint8
    assert got.ravel().tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("data, reason", [
    (b"", "the file is empty"),
    (bytes([0, 0, 8]), "too short for an IDX header"),
    (idx(L.LABELS_MAGIC, [2], [1, 2]), "wrong magic number 0x00000801, expected 0x00000803"),
    (idx(L.IMAGES_MAGIC, [2, 1], []), "truncated inside its header"),
    (idx(L.IMAGES_MAGIC, [2, 1, 3], [1, 2, 3]), "truncated: header [2, 1, 3] needs 6 bytes of data, the file has 3"),
    (idx(L.IMAGES_MAGIC, [1, 1, 1], [1, 2]), "1 bytes of trailing garbage"),
    (idx(L.IMAGES_MAGIC, [2**32 - 1, 2**32 - 1, 2], []), "more data than any IDX file holds"),
])
def test_rejects_broken_files_naming_the_file_and_the_reason(data, reason):
    with pytest.raises(L.DataError) as e:
        L.parse_idx(data, L.IMAGES_MAGIC, "some-file")
    assert str(e.value).startswith("some-file: ")
    assert reason in str(e.value)


def test_gzip_is_recognised_by_its_magic_bytes_not_the_name(tmp_path):
    raw = idx(L.LABELS_MAGIC, [3], [7, 2, 1])
    (tmp_path / "plain-named.gz").write_bytes(raw)  # plain bytes behind a .gz name
    (tmp_path / "gzipped-named-plain").write_bytes(gzip.compress(raw))  # and the other way round
    assert L.read_maybe_gzip(tmp_path / "plain-named.gz") == raw
    assert L.read_maybe_gzip(tmp_path / "gzipped-named-plain") == raw
    (tmp_path / "corrupt").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(L.DataError, match="corrupt.*corrupt gzip data"):
        L.read_maybe_gzip(tmp_path / "corrupt")


@pytest.mark.parametrize("gz", [False, True])
def test_loads_a_split_plain_or_gzipped(tmp_path, gz):
    images, labels = L.load_split_raw(write_split(tmp_path / "d", gz=gz), "t10k")
    assert images.shape == (3, 28, 28) and labels.tolist() == [0, 1, 2]
    assert images[2].min() == images[2].max() == 2


def test_split_level_checks_name_the_file(tmp_path):
    with pytest.raises(L.DataError, match=r"missing t10k-images-idx3-ubyte \(or t10k-images-idx3-ubyte.gz\)"):
        L.load_split_raw(write_split(tmp_path / "a", prefix="train"), "t10k")
    with pytest.raises(L.DataError, match=r"t10k-labels-idx1-ubyte: 2 labels for the 3 images"):
        L.load_split_raw(write_split(tmp_path / "b", labels=[1, 2]), "t10k")
    with pytest.raises(L.DataError, match=r"t10k-labels-idx1-ubyte: label 12 at index 1 is out of range"):
        L.load_split_raw(write_split(tmp_path / "c", labels=[1, 12, 3]), "t10k")
    with pytest.raises(L.DataError, match=r"t10k-images-idx3-ubyte: images are 27x28, expected 28x28"):
        L.load_split_raw(write_split(tmp_path / "e", rows=27), "t10k")
    with pytest.raises(L.DataError, match="does not exist"):
        L.load_split_raw(tmp_path / "nowhere", "t10k")


def test_pads_by_two_with_background_then_normalises():
    """Same case as data/mod.rs pads_by_two_with_background_and_normalises."""
    pixels = np.zeros((1, 28, 28), np.uint8)
    pixels[0, 0, 0] = 255  # top-left pixel of the 28x28 image
    x = L.preprocess(pixels, 0.5, 0.25)
    assert x.shape == (1, 1, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 2, 2] == (1.0 - 0.5) / 0.25  # moved by the 2-pixel pad
    assert x[0, 0, 0, 0] == x[0, 0, 2, 3] == (0.0 - 0.5) / 0.25  # padding is black before normalising


def test_the_constants_match_the_paper_and_the_data(test_set):
    assert (L.IMAGE_SIZE, L.INPUT_SIZE, L.PAD) == (28, 32, 2)
    assert L.NORMALIZATION["mnist"] == (0.1307, 0.3081)
    assert L.NORMALIZATION["fashion-mnist"] == (0.2860, 0.3530)
    x, y = test_set
    assert x.shape == (10_000, 1, 32, 32) and y.dtype == torch.int64
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # The 28x28 centre of the normalised test set has (nearly) the training statistics.
    centre = x[:, :, 2:30, 2:30] * 0.3081 + 0.1307
    assert abs(centre.mean().item() - 0.1325) < 1e-3 and abs(centre.std().item() - 0.3105) < 1e-3


def test_fashion_mnist_reads_from_its_gzipped_files():
    folder = L.default_data_dir("fashion-mnist")
    if not (folder / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is in none of {L.DEFAULT_DATA_DIRS['fashion-mnist']}; {L.FETCH_HINT['fashion-mnist']}")
    x, y = L.load_split(folder, "t10k", "fashion-mnist")
    assert x.shape == (10_000, 1, 32, 32)
    assert torch.bincount(y).tolist() == [1000] * 10
    centre = x[:, :, 2:30, 2:30] * 0.3530 + 0.2860
    assert abs(centre.mean().item() - 0.2860) < 5e-3 and abs(centre.std().item() - 0.3530) < 5e-3
