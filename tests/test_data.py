"""The data set registry: each file format read through the real readers from tiny files
written here, normalization, subsets, padding, errors, the CLI and downloads (served from
127.0.0.1 only)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import pickle
import struct
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from rankbias import data
from rankbias.cli.main import main
from rankbias.data import dataset_status, download, list_datasets, load_dataset
from rankbias.utils import RankbiasError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --- writers of the real formats --------------------------------------------------------
def idx_bytes(arr: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) \
        + arr.astype(np.uint8).tobytes()


def mnist_arrays(n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), np.arange(n_train) % 10,
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), np.arange(n_test) % 10)


def write_idx_set(folder: Path, arrays, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(IDX_NAMES, arrays):
        raw = idx_bytes(np.asarray(arr))
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


def cifar_arrays(n_per_batch=4, n_test=6, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    batches = [(rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                list(rng.integers(0, classes, n_per_batch))) for _ in range(5)]
    test = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            list(rng.integers(0, classes, n_test)))
    return batches, test


def dump(path: Path, obj, protocol=2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(folder: Path, batches, test, byte_keys=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda k: k.encode()) if byte_keys else (lambda k: k)
    for i, (x, y) in enumerate(batches, 1):
        dump(folder / f"data_batch_{i}", {key("data"): x, key("labels"): [int(v) for v in y]})
    dump(folder / "test_batch", {key("data"): test[0], key("labels"): [int(v) for v in test[1]]})
    dump(folder / "batches.meta", {key("label_names"): [f"c{i}" for i in range(10)]})


def write_svhn(folder: Path, n_train=7, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 is digit 0
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


# --- registry, digits -------------------------------------------------------------------
def test_registry_names():
    assert list_datasets() == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100",
                               "svhn", "mnist1d", "synthetic", "modular-addition"]
    with pytest.raises(RankbiasError, match="unknown data set 'imagenet'.*digits"):
        load_dataset("imagenet")
    with pytest.raises(RankbiasError, match="unknown option bogus"):
        load_dataset("digits", bogus=1)


def test_digits_split_is_stratified_and_deterministic():
    data._digits_arrays.cache_clear()
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert (ds.num_classes, ds.input_shape, ds.name) == (10, (1, 8, 8), "digits")
    # every class of the test set within one example of its share of the full set
    full = np.bincount(np.concatenate([ds.y_train.numpy(), ds.y_test.numpy()]))
    assert full.sum() == 1797
    assert np.all(np.abs(np.bincount(ds.y_test.numpy()) - full * 360 / 1797) < 1)
    # the split does not depend on the training seed, and is the same every time
    again = load_dataset("digits", seed=123)
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.y_train, again.y_train)


def test_digits_match_sklearn_and_split_partitions_them():
    from sklearn.datasets import load_digits

    ref = load_digits()
    images, labels, _ = data._digits_arrays()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.target)
    ds = load_dataset("digits", normalize=False)
    assert ds.mean is None and ds.x_train.max() <= 1.0
    got = np.concatenate([ds.x_train, ds.x_test]).reshape(1797, 64) * 16
    key = lambda rows: sorted(map(bytes, np.rint(rows).astype(np.uint8)))  # noqa: E731
    assert key(got) == key(ref.data)


def test_normalization_uses_train_split_statistics():
    ds = load_dataset("digits")
    raw = load_dataset("digits", normalize=False)
    assert ds.mean[0] == pytest.approx(raw.x_train.double().mean().item(), rel=1e-6)
    assert ds.std[0] == pytest.approx(raw.x_train.double().std(unbiased=False).item(), rel=1e-6)
    assert ds.x_train.mean().item() == pytest.approx(0, abs=1e-5)
    assert ds.x_train.std(unbiased=False).item() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(ds.x_test, (raw.x_test - ds.mean[0]) / ds.std[0])


def test_subset_is_stratified_seeded_and_keeps_full_statistics():
    full = load_dataset("digits")
    a = load_dataset("digits", subset=200, seed=1)
    b = load_dataset("digits", subset=200, seed=1)
    c = load_dataset("digits", subset=200, seed=2)
    assert a.x_train.shape[0] == 200 and a.x_test.shape[0] == 360
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    share = np.bincount(full.y_train.numpy()) * 200 / 1437
    assert np.all(np.abs(np.bincount(a.y_train.numpy(), minlength=10) - share) < 1)
    assert a.mean == full.mean and a.std == full.std  # stats of the whole training split
    assert load_dataset("digits", subset=0.5).x_train.shape[0] == 718
    for bad in (0, 5000, -1, 1.5, True, "10"):
        with pytest.raises(RankbiasError, match="subset"):
            load_dataset("digits", subset=bad)


def test_pad_to_and_channels():
    raw = load_dataset("digits", normalize=False)
    padded = load_dataset("digits", normalize=False, pad_to=12, channels=3)
    assert padded.input_shape == (3, 12, 12) and padded.x_train.shape == (1437, 3, 12, 12)
    torch.testing.assert_close(padded.x_train[:, :, 2:10, 2:10], raw.x_train.expand(-1, 3, -1, -1))
    inner = torch.zeros(12, 12, dtype=torch.bool)
    inner[2:10, 2:10] = True
    assert padded.x_train[..., ~inner].abs().max() == 0  # zero (black) padding
    odd = load_dataset("digits", normalize=False, pad_to=11)
    torch.testing.assert_close(odd.x_train[:, :, 1:9, 1:9], raw.x_train)  # extra at bottom/right
    norm = load_dataset("digits", pad_to=12)
    assert norm.x_train.mean().item() == pytest.approx(0, abs=1e-5)  # stats after padding
    with pytest.raises(RankbiasError, match="smaller"):
        load_dataset("digits", pad_to=6)
    with pytest.raises(RankbiasError, match="pad_to needs images"):
        load_dataset("synthetic", pad_to=32)
    vec = load_dataset("synthetic", n_train=20, n_test=10, channels=2)
    assert vec.input_shape == (2, 20) and torch.equal(vec.x_train[:, 0], vec.x_train[:, 1])


# --- IDX: MNIST, Fashion-MNIST ----------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["", "mnist", "MNIST/raw"])
def test_mnist_idx_files(tmp_path, gz, layout):
    arrays = mnist_arrays()
    write_idx_set(tmp_path / layout, arrays, gz)
    ds = load_dataset("mnist", root=tmp_path, normalize=False)
    assert ds.source == str(tmp_path / layout if layout else tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(ds.x_train[:, 0].numpy() * 255, arrays[0], atol=1e-3)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays[3])
    norm = load_dataset("mnist", root=tmp_path)
    assert norm.mean[0] == pytest.approx(arrays[0].mean() / 255, rel=1e-6)
    assert norm.std[0] == pytest.approx(arrays[0].std() / 255, rel=1e-6)


def test_root_from_environment_and_fashion_layout(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "fashion-mnist", mnist_arrays(seed=3), gz=True)
    monkeypatch.setenv("RANKBIAS_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    ds = load_dataset("fashion_mnist", pad_to=32, channels=3)  # alias, then root from env
    assert ds.source == str(tmp_path / "fashion-mnist") and ds.input_shape == (3, 32, 32)
    monkeypatch.delenv("RANKBIAS_DATA")
    assert data.default_root() == Path.home() / ".cache" / "rankbias" / "data"


def corrupt_cases():
    good = mnist_arrays()
    header_only = idx_bytes(good[0])[:16]
    return {
        "bad magic": ("train-images-idx3-ubyte", b"\x00\x00\x09\x03" + idx_bytes(good[0])[4:],
                      "magic"),
        "truncated": ("train-images-idx3-ubyte", idx_bytes(good[0])[:-100], "header promises"),
        "header only": ("train-images-idx3-ubyte", header_only, "header promises"),
        "empty": ("train-images-idx3-ubyte", b"", "magic"),
        "truncated gzip": ("train-images-idx3-ubyte.gz",
                           gzip.compress(idx_bytes(good[0]))[:-50], "gzip"),
        "wrong size": ("train-images-idx3-ubyte", idx_bytes(good[0][:, :20, :20]), "28x28"),
        "count mismatch": ("train-labels-idx1-ubyte", idx_bytes(good[1][:5]), "5 labels"),
        "bad label": ("t10k-labels-idx1-ubyte", idx_bytes(np.full(10, 11)), "label 11"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_idx_files_name_the_file(tmp_path, case):
    write_idx_set(tmp_path, mnist_arrays(), gz=False)
    filename, content, why = corrupt_cases()[case]
    (tmp_path / filename.removesuffix(".gz")).unlink()
    (tmp_path / filename).write_bytes(content)
    with pytest.raises(RankbiasError, match=why) as err:
        load_dataset("mnist", root=tmp_path)
    assert str(tmp_path / filename) in str(err.value)
    assert "rankbias data download mnist" in str(err.value)


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(RankbiasError, match="mnist not found.*rankbias data download mnist"):
        load_dataset("mnist", root=tmp_path)
    write_idx_set(tmp_path / "mnist", mnist_arrays(), gz=True)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(RankbiasError, match="only some.*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(RankbiasError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST not installed: apt-get install "
                           "dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path):
    ds = load_dataset("fashion-mnist", root=tmp_path, subset=1000)  # empty root: system copy
    assert ds.source == str(FASHION)
    assert ds.x_train.shape == (1000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10
    assert np.bincount(ds.y_train.numpy()).tolist() == [100] * 10  # stratified subset
    # the published statistics of the 60000 training images
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-3)


# --- CIFAR ------------------------------------------------------------------------------
@pytest.mark.parametrize("parent", [True, False])
@pytest.mark.parametrize("byte_keys", [True, False])
def test_cifar10_pickles(tmp_path, parent, byte_keys):
    batches, test = cifar_arrays()
    folder = tmp_path / "cifar-10-batches-py" if parent else tmp_path
    write_cifar10(folder, batches, test, byte_keys)
    ds = load_dataset("cifar10", root=tmp_path, normalize=False)
    assert ds.source == str(folder) and ds.classes == [f"c{i}" for i in range(10)]
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    x = np.concatenate([b[0] for b in batches]).reshape(20, 3, 32, 32)
    np.testing.assert_allclose(ds.x_train.numpy() * 255, x, atol=1e-3)
    np.testing.assert_array_equal(ds.y_train.numpy(), np.concatenate([b[1] for b in batches]))
    # per-channel statistics of CIFAR-10's own training split (not CIFAR-100's)
    norm = load_dataset("cifar10", root=tmp_path)
    np.testing.assert_allclose(norm.mean, x.mean(axis=(0, 2, 3)) / 255, rtol=1e-6)
    np.testing.assert_allclose(norm.std, x.std(axis=(0, 2, 3)) / 255, rtol=1e-6)
    np.testing.assert_allclose(norm.x_train.mean(dim=(0, 2, 3)), 0, atol=1e-5)


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    split = {}
    for name, n in (("train", 12), ("test", 4)):
        split[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                       "fine_labels": list(range(88, 88 + n)) if name == "train" else [0] * n,
                       "coarse_labels": [i % 20 for i in range(n)]}
        dump(folder / name, split[name])
    dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                           "coarse_label_names": [f"g{i}" for i in range(20)]})
    fine = load_dataset("cifar100", root=tmp_path)
    assert fine.num_classes == 100 and fine.y_train.tolist() == list(range(88, 100))
    assert fine.classes[99] == "f99"
    coarse = load_dataset("cifar100", root=tmp_path / "cifar-100-python", labels="coarse")
    assert coarse.num_classes == 20 and coarse.y_test.tolist() == [0, 1, 2, 3]
    with pytest.raises(RankbiasError, match="'fine'"):
        load_dataset("cifar100", root=tmp_path, labels="medium")


class _Boom:  # a pickle that would run code when loaded
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("case", ["truncated", "garbage", "code", "shape", "labels", "not dict"])
def test_corrupt_cifar_names_the_file(tmp_path, case, capsys):
    batches, test = cifar_arrays()
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, batches, test)
    target = folder / "data_batch_3"
    if case == "truncated":
        target.write_bytes(target.read_bytes()[:500])
    elif case == "garbage":
        target.write_bytes(b"\x80\x02not a pickle at all")
    elif case == "code":
        dump(target, {"data": _Boom(), "labels": []})
    elif case == "shape":
        dump(target, {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})
    elif case == "labels":
        dump(target, {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]})
    else:
        dump(target, [1, 2, 3])
    with pytest.raises(RankbiasError) as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(target) in str(err.value) and "rankbias data download cifar10" in str(err.value)
    assert "pwned" not in capsys.readouterr().out  # the pickle's code never ran
    if case == "code":
        assert "print, which a data file never needs" in str(err.value)


def test_missing_cifar_batch(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py", *cifar_arrays())
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(RankbiasError, match="missing .*data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


# --- SVHN -------------------------------------------------------------------------------
def test_svhn_mat(tmp_path):
    arrays = write_svhn(tmp_path / "svhn")
    ds = load_dataset("svhn", root=tmp_path, normalize=False)
    x, y = arrays["train"]
    assert ds.x_train.shape == (7, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    # (H, W, C, N) -> (N, C, H, W)
    assert ds.x_train[4, 2, 5, 9].item() * 255 == pytest.approx(x[5, 9, 2, 4], abs=1e-3)
    np.testing.assert_allclose(ds.x_train.numpy() * 255, x.transpose(3, 2, 0, 1), atol=1e-3)
    assert ds.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert load_dataset("svhn", root=tmp_path).y_test.tolist() == [1, 2, 3, 4, 5]
    write_svhn(tmp_path / "svhn", n_train=10)
    assert load_dataset("svhn", root=tmp_path).y_train[-1].item() == 0  # label 10 is digit 0


@pytest.mark.parametrize("case", ["garbage", "no y", "shape", "truncated"])
def test_corrupt_svhn(tmp_path, case):
    write_svhn(tmp_path)
    target = tmp_path / "train_32x32.mat"
    if case == "garbage":
        target.write_bytes(b"MATLAB? no" * 20)
    elif case == "no y":
        scipy.io.savemat(target, {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    elif case == "shape":
        scipy.io.savemat(target, {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    else:
        target.write_bytes(target.read_bytes()[:3000])
    with pytest.raises(RankbiasError) as err:
        load_dataset("svhn", root=tmp_path)
    assert str(target) in str(err.value) and "rankbias data download svhn" in str(err.value)


# --- generated data sets ----------------------------------------------------------------
def test_synthetic_is_seeded_and_balanced():
    a = load_dataset("synthetic", n_train=600, n_test=100, dim=8, num_classes=5)
    b = load_dataset("synthetic", n_train=600, n_test=100, dim=8, num_classes=5)
    c = load_dataset("synthetic", n_train=600, n_test=100, dim=8, num_classes=5, data_seed=1)
    assert a.x_train.shape == (600, 8) and a.input_shape == (8,) and a.num_classes == 5
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert np.bincount(a.y_train.numpy(), minlength=5).min() > 40  # no class starved
    with pytest.raises(RankbiasError, match="dim"):
        load_dataset("synthetic", dim=0)


def test_mnist1d_generated_offline():
    pytest.importorskip("mnist1d", reason="optional extra: pip install mnist1d")
    ds = load_dataset("mnist1d", num_samples=200)
    assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)
    assert ds.input_shape == (40,) and set(ds.y_train.tolist()) <= set(range(10))
    state = np.random.get_state()[1].copy()
    chan = load_dataset("mnist1d", num_samples=200, data_seed=7, channels=1)
    assert chan.input_shape == (1, 40)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global RNG untouched


@pytest.mark.parametrize("name, options", [
    ("digits", {}), ("digits", {"subset": 300}),
    ("synthetic", {"n_train": 120, "n_test": 33, "dim": 5}),
    ("modular-addition", {"p": 11, "train_fraction": 0.5}),
    ("mnist1d", {"num_samples": 203}),
    ("fashion-mnist", {"subset": 500}),
])
def test_planned_sizes_are_the_loaded_ones(name, options):
    """The sizes a sweep is planned with (no file read) against the data set loaded."""
    if name == "mnist1d":
        pytest.importorskip("mnist1d", reason="optional extra: pip install mnist1d")
    if name == "fashion-mnist" and not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("real Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    ds = load_dataset(name, **options)
    train, shape, classes = data.describe(name, options)
    assert (train, shape, classes) == (len(ds.x_train), ds.input_shape, ds.num_classes)
    assert data.n_test_examples(name, options) == len(ds.x_test)


def test_mnist1d_missing_package(monkeypatch):
    data._mnist1d_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # import mnist1d raises ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(RankbiasError, match="pip install mnist1d"):
        load_dataset("mnist1d", num_samples=100)


# --- status and the CLI -----------------------------------------------------------------
def test_dataset_status(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", mnist_arrays(), gz=True)
    write_cifar10(tmp_path / "cifar-10-batches-py", *cifar_arrays())
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    rows = {r["name"]: r for r in dataset_status(tmp_path)}
    assert list(rows) == list_datasets()
    assert rows["digits"]["available"] and rows["synthetic"]["available"]
    assert rows["mnist"]["available"] and rows["mnist"]["location"] == str(tmp_path / "MNIST/raw")
    assert not rows["cifar10"]["available"]
    assert rows["cifar10"]["missing"] == [str(tmp_path / "cifar-10-batches-py" / "test_batch")]
    assert not rows["svhn"]["available"] and rows["svhn"]["missing"] == []
    assert "rankbias data download svhn" in rows["svhn"]["how_to_get"]


def test_cli_data_list(tmp_path, capsys):
    write_idx_set(tmp_path, mnist_arrays(), gz=False)
    assert main(["data", "list", "--root", str(tmp_path), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["available"] for r in rows}["mnist"] is True
    assert main(["data", "list", "--root", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "mnist" in table and "rankbias data download cifar10" in table


def test_cli_download_bad_names(tmp_path, capsys):
    assert main(["data", "download", "imagenet", "--root", str(tmp_path)]) == 2
    assert "unknown data set 'imagenet'" in capsys.readouterr().err
    assert main(["data", "download", "digits", "--root", str(tmp_path)]) == 2
    assert "needs no download" in capsys.readouterr().err


# --- downloads from a local server ------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (folder, base url)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # never route the test through a proxy
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/files"
    httpd.shutdown()
    httpd.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_download_mnist_verifies_and_skips(server, tmp_path):
    served, url = server
    write_idx_set(served / "files", mnist_arrays(), gz=True)
    sums = {f"{n}.gz": md5(served / "files" / f"{n}.gz") for n in IDX_NAMES}
    root = tmp_path / "root"
    folder = download("mnist", root, base_url=url, progress=False, checksums=sums)
    assert folder == root / "mnist"
    assert sorted(p.name for p in files_under(root)) == sorted(sums)
    assert load_dataset("mnist", root=root).x_train.shape == (30, 1, 28, 28)
    for f in (served / "files").iterdir():  # present with the right checksum: not fetched
        f.unlink()
    assert download("mnist", root, base_url=url, progress=False, checksums=sums) == folder


def test_download_cifar10_tarball(server, tmp_path):
    served, url = server
    staging = tmp_path / "staging"
    write_cifar10(staging / "cifar-10-batches-py", *cifar_arrays())
    (served / "files").mkdir()
    tarball = served / "files" / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    root = tmp_path / "root"
    folder = download("cifar10", root, base_url=url, progress=False,
                      checksums={"cifar-10-python.tar.gz": sha})
    assert folder == root / "cifar-10-batches-py"
    assert not (root / "cifar-10-python.tar.gz").exists()  # the tarball is removed
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temp dirs
    assert load_dataset("cifar10", root=root).x_train.shape == (20, 3, 32, 32)


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path, capsys):
    served, url = server
    write_idx_set(served / "files", mnist_arrays(), gz=True)
    root = tmp_path / "root"
    with pytest.raises(RankbiasError, match="checksum mismatch"):
        download("mnist", root, base_url=url, progress=False,
                 checksums={f"{n}.gz": "0" * 32 for n in IDX_NAMES})
    assert files_under(root) == []
    # through the CLI, with the official checksums (our tiny files cannot match them)
    assert main(["data", "download", "mnist", "--root", str(root), "--base-url", url,
                 "--quiet"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert files_under(root) == []
    with pytest.raises(RankbiasError, match="could not download"):
        download("svhn", root, base_url=url, progress=False)
    assert files_under(root) == []


def test_download_bad_tarball(server, tmp_path):
    served, url = server
    (served / "files").mkdir()
    tarball = served / "files" / "cifar-100-python.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("something-else/readme")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    tarball.write_bytes(buf.getvalue())
    with pytest.raises(RankbiasError, match="does not contain cifar-100-python"):
        download("cifar100", tmp_path / "root", base_url=url, progress=False,
                 checksums={"cifar-100-python.tar.gz": md5(tarball)})
    assert files_under(tmp_path / "root") == []
