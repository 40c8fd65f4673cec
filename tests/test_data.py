"""fxsparse.data: the bundled real dataset, local-format loaders, splits, on-device augmentation."""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fxsparse import data
from fxsparse.data import DataError, ImageDataset, TensorLoader, random_crop, random_hflip, split


@pytest.fixture(scope="module")
def mnist5k():
    return data.load()


def _toy(n_per_class=6, classes=3, shape=(3, 5, 7), seed=0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    n = n_per_class * classes
    images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return ImageDataset(images, labels, tuple(f"c{i}" for i in range(classes)), "toy")


# --------------------------------------------------------------------------- the bundled set
def test_default_dataset_is_real_mnist(mnist5k):
    s = mnist5k
    assert data.DEFAULT == "mnist5k" and s.name == "mnist5k"
    assert (len(s.train), len(s.val), len(s.test)) == (3600, 400, 1000)
    for part in (s.train, s.val, s.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (1, 28, 28)
        assert part.labels.dtype == torch.int64
    assert torch.bincount(s.test.labels).tolist() == [100] * 10
    assert torch.bincount(s.val.labels).tolist() == [40] * 10
    # MNIST's well-known statistics: mean 0.1307, std 0.3081, ~81% background pixels
    assert s.mean[0] == pytest.approx(0.1307, abs=0.003) and s.std[0] == pytest.approx(0.3081, abs=0.005)
    x = s.train.images.float() / 255
    assert 0.75 < (x == 0).float().mean() < 0.85
    # handwriting, not noise: ink sits in the centre, the border rows are blank, a "1" has less ink than a "0"
    assert x[..., :2, :].mean() < 0.002 and x[..., 10:18, 10:18].mean() > 0.3
    ink = [x[s.train.labels == c].mean().item() for c in range(10)]
    assert ink[1] < 0.6 * ink[0]


def test_splits_are_fixed_and_disjoint(mnist5k):
    again = data.load()
    assert torch.equal(again.val.images, mnist5k.val.images)
    other = data.load(seed=1)
    assert torch.equal(other.test.images, mnist5k.test.images)  # the test split never moves
    assert not torch.equal(other.val.images, mnist5k.val.images)
    everything = torch.cat([mnist5k.train.images, mnist5k.val.images, mnist5k.test.images]).flatten(1)
    assert len(torch.unique(everything, dim=0)) == 5000  # a partition of the 5,000 distinct images


def test_digits_loads():
    s = data.load("digits")
    assert s.shape == (1, 8, 8) and len(s.train) + len(s.val) + len(s.test) == 1797
    assert s.train.images.max() == 255 and s.num_classes == 10


def test_split_is_stratified():
    ds = _toy(n_per_class=10)
    rest, carved = split(ds, 0.2, seed=3)
    assert torch.bincount(carved.labels).tolist() == [2, 2, 2]
    assert len(rest) + len(carved) == len(ds)
    seen = torch.cat([rest.images, carved.images]).flatten(1)
    assert len(torch.unique(seen, dim=0)) == len(ds)


# --------------------------------------------------------------------------- augmentation
def test_random_crop_matches_padded_windows():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.int64).reshape(2, 3, 5, 7).to(torch.uint8)
    p = 2
    out = random_crop(x, p, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # the same draws: first the row offsets, then the columns
    dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=gen), torch.randint(0, 2 * p + 1, (2,), generator=gen)
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7])
    assert random_crop(x, 0) is x


def test_random_crop_covers_all_offsets_and_pads_with_zero():
    x = torch.full((4000, 1, 3, 3), 9, dtype=torch.uint8)
    x[:, :, 1, 1] = 200  # the centre pixel
    out = random_crop(x, 1, torch.Generator().manual_seed(1))
    where = torch.nonzero(out[:, 0] == 200)[:, 1:]
    assert {tuple(w) for w in where.tolist()} == {(r, c) for r in range(3) for c in range(3)}
    assert set(torch.unique(out).tolist()) == {0, 9, 200}


def test_random_hflip():
    x = torch.arange(6 * 1 * 2 * 4).reshape(6, 1, 2, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(6)]
    assert all(f or torch.equal(out[i], x[i]) for i, f in enumerate(flipped))
    assert 0 < sum(flipped) < 6
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1)) and torch.equal(random_hflip(x, p=0.0), x)


# --------------------------------------------------------------------------- loader
def test_loader_shapes_normalization_and_epochs():
    ds = _toy(n_per_class=7)
    mean, std = ds.stats()
    loader = TensorLoader(ds, 4, shuffle=True, mean=mean, std=std, seed=5)
    assert len(loader) == 6
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 4, 4, 4, 1]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (21, 3, 5, 7)
    restored = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255
    labels = torch.cat([b[1] for b in batches])
    # without augmentation every image comes back exactly, each once per epoch
    assert sorted(map(tuple, restored.round().to(torch.uint8).flatten(1).tolist())) == \
        sorted(map(tuple, ds.images.flatten(1).tolist()))
    assert torch.bincount(labels).tolist() == [7, 7, 7]
    second = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in loader]), second)  # set_epoch replays an epoch exactly
    assert not torch.equal(second, labels)
    assert len(TensorLoader(ds, 4, drop_last=True)) == 5


def test_loader_augments_and_repeats_channels(mnist5k):
    train, val, test = mnist5k.loaders(32, channels=3, crop_padding=4, hflip=True)
    x, y = next(iter(train))
    assert x.shape == (32, 3, 28, 28) and torch.equal(x[:, 0], x[:, 2]) and y.shape == (32,)
    assert train.shuffle and train.crop_padding == 4 and not val.shuffle and val.crop_padding == 0
    assert not train.hflip  # digits are never flipped
    xv, _ = next(iter(val))
    assert xv.mean().abs() < 0.3 and 0.7 < xv.std() < 1.3  # normalized with the train statistics


def test_loaders_follow_recipe(mnist5k):
    import fxsparse

    recipe = fxsparse.load_recipe("tost", overrides={"training.batch_size": 50, "training.crop_padding": 2})
    train, _, _ = mnist5k.loaders(recipe=recipe)
    assert train.batch_size == 50 and train.crop_padding == 2
    toy = data.Splits(_toy(), _toy(), _toy(), (0.5,) * 3, (0.25,) * 3, "toy")
    assert toy.loaders(recipe=recipe)[0].hflip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda(mnist5k):
    train, val, _ = mnist5k.loaders(64, device="cuda", channels=3)
    assert train.images.is_cuda and train.labels.is_cuda
    x, y = next(iter(train))
    assert x.is_cuda and y.is_cuda and x.shape == (64, 3, 28, 28)
    xv = torch.cat([b for b, _ in val]).cpu()
    assert torch.allclose(xv, torch.cat([b for b, _ in mnist5k.loaders(64, channels=3)[1]]), atol=1e-5)


# --------------------------------------------------------------------------- local formats
def _write_cifar(root, classes=10, per_batch=4):
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    written = {}
    for name in names:
        batch = {b"data": gen.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 key: gen.integers(0, classes, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = batch
    label_names = [f"class{i}".encode() for i in range(classes)]
    meta = {b"label_names": label_names} if classes == 10 else {b"fine_label_names": label_names}
    (folder / ("batches.meta" if classes == 10 else "meta")).write_bytes(pickle.dumps(meta))
    return folder, written


def test_cifar10_from_directory_and_archive(tmp_path):
    folder, written = _write_cifar(tmp_path)
    train, test = data.load_cifar(tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes[3] == "class3"
    first = written["data_batch_1"]
    # CIFAR rows are channel-major: 1024 red, then green, then blue values
    assert torch.equal(train.images[0, 1].flatten(), torch.from_numpy(first[b"data"][0, 1024:2048]))
    assert train.labels[:4].tolist() == first[b"labels"]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    train2, test2 = data.load_cifar(archive)
    assert torch.equal(train2.images, train.images) and torch.equal(test2.labels, test.labels)
    s = data.load("cifar10", root=folder, val_fraction=0.25)
    assert len(s.train) + len(s.val) == 20 and len(s.test) == 4


def test_cifar100(tmp_path):
    _write_cifar(tmp_path, classes=100)
    train, test = data.load_cifar(tmp_path, num_classes=100)
    assert train.num_classes == 100 and len(train) == 4 and len(test) == 4


def test_cifar_refuses_pickled_code(tmp_path):
    folder, _ = _write_cifar(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": os.getcwd}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy"):
        data.load_cifar(tmp_path)


def test_imagefolder(tmp_path):
    from PIL import Image

    gen = np.random.default_rng(0)
    for part, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(gen.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(tmp_path / part / cls / f"{i}.png")
    ds = data.load_imagefolder(tmp_path / "train")
    assert ds.classes == ("cat", "dog") and ds.images.shape == (6, 3, 6, 9) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    png = np.array(Image.open(tmp_path / "train" / "dog" / "0.png"))
    assert torch.equal(ds.images[3], torch.from_numpy(png).permute(2, 0, 1))
    s = data.load("imagefolder", root=tmp_path, val_fraction=0.34)
    assert len(s.test) == 4 and len(s.val) == 2 and len(s.train) == 4
    assert data.load_imagefolder(tmp_path / "train", size=(4, 4)).shape == (3, 4, 4)


def test_idx(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([2, 0, 1], dtype=np.uint8)
    with gzip.open(tmp_path / "img.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes())
    (tmp_path / "lab").write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + labels.tobytes())
    ds = data.load_idx(tmp_path / "img.gz", tmp_path / "lab")
    assert ds.images.shape == (3, 1, 4, 5) and torch.equal(ds.images[1, 0], torch.from_numpy(images[1]))
    assert ds.labels.tolist() == [2, 0, 1] and ds.classes == ("0", "1", "2")


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DEBIAN), reason="Debian's dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    s = data.load("fashion-mnist")
    assert (len(s.train) + len(s.val), len(s.test)) == (60000, 10000) and s.classes[0] == "T-shirt/top"
    assert s.mean[0] == pytest.approx(0.286, abs=0.002)


def test_save_and_load_round_trip(tmp_path, mnist5k):
    small = data.Splits(mnist5k.train.per_class(5), mnist5k.val.per_class(2), mnist5k.test.per_class(2),
                        mnist5k.mean, mnist5k.std, "mnist5k")
    assert torch.bincount(small.train.labels).tolist() == [5] * 10
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"set{suffix}"
        size = data.save(small, path)
        assert size == path.stat().st_size and size < 2**20
        back = data.load(path)
        assert back.classes == small.classes and back.mean == small.mean and back.name == "mnist5k"
        for part in ("train", "val", "test"):
            assert torch.equal(getattr(back, part).images, getattr(small, part).images)
            assert torch.equal(getattr(back, part).labels, getattr(small, part).labels)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        data.load("imagenet-22k")
    with pytest.raises(DataError, match="root="):
        data.load("cifar10")
    with pytest.raises(DataError, match="no CIFAR-10"):
        data.load_cifar(tmp_path)
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="channels"):
        TensorLoader(_toy(), 2, channels=1)
