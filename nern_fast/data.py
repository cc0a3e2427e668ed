"""Data sets and the batch streams the training loops read.

* ``digits`` (the embedded default): scikit-learn's 8×8 handwritten digits (1,797 images, 10
  classes, shipped inside scikit-learn, no download), split train/test once with a fixed seed,
  optionally resized, standardised with the training set's mean and std, kept in memory on the
  training device; ``augment`` translates training images by up to 1 pixel (per 8 pixels).
* ``cifar10`` / ``cifar100``: torchvision from ``data.root`` (downloaded there when the machine
  can; otherwise a clear error naming the folder), NeRN's normalisation and augmentation.
* ``imagenet``: ``root/train`` and ``root/val`` ImageFolders, the usual crops.
* noise inputs (data-free distillation): uniform images in the data's pixel range (or Gaussian
  in the normalised space, as NeRN's random data), the data set's shape, drawn on the device.

Streams are resumable: their ``state_dict()`` (epoch, position, generator state) restored with
``load_state_dict()`` gives the same batches an uninterrupted run would have read (for in-memory
data and noise exactly; for DataLoader data the order is exact, the random augmentation of the
resumed epoch is not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")
# NeRN's CIFAR normalisation (akamaster's training script uses the ImageNet statistics).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A data set that cannot be found, downloaded or read; the message says what to do."""


@dataclass
class TaskData:
    """A classification task: how to stream its training set and evaluate on its test set."""

    name: str
    num_classes: int
    input_shape: tuple  # (C, H, W) of one model input
    train_size: int
    test_size: int
    mean: tuple  # per-channel normalisation applied to the inputs
    std: tuple
    _train: object = None  # tensors (x, y) or a torch Dataset
    _test: object = None
    _in_memory: bool = True
    augment_shift: int = 0  # in-memory data: random translation by up to this many pixels

    def train_stream(self, batch_size: int, device, seed: int = 0, num_workers: int = 0,
                     drop_last: bool = True, augment: bool = False) -> "BatchStream":
        if self._in_memory:
            x, y = self._train
            return TensorStream(x, y, batch_size, device, seed, drop_last,
                                shift=self.augment_shift if augment else 0)
        return LoaderStream(self._train, batch_size, device, seed, num_workers, drop_last)

    def noise_stream(self, batch_size: int, device, seed: int = 0, kind: str = "uniform") -> "NoiseStream":
        return NoiseStream(self.input_shape, batch_size, device, seed, kind, self.mean, self.std)

    def test_batches(self, batch_size: int, device, num_workers: int = 0,
                     max_batches: Optional[int] = None) -> Iterator[tuple]:
        """Test set batches (x, y) on ``device``, in a fixed order."""
        device = torch.device(device)
        if self._in_memory:
            x, y = self._test
            count = 0
            for start in range(0, x.shape[0], batch_size):
                if max_batches is not None and count >= max_batches:
                    return
                yield (x[start:start + batch_size].to(device, non_blocking=True),
                       y[start:start + batch_size].to(device, non_blocking=True))
                count += 1
            return
        loader = torch.utils.data.DataLoader(self._test, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                return
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ------------------------------------------------------------------------------ streams
class BatchStream:
    """An endless, resumable stream of training batches."""

    steps_per_epoch: int

    def next(self) -> tuple:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        """Stop any background threads and workers; the next batch is the one that was due."""


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so resuming is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate every image of a batch by up to ``shift`` pixels (edges replicated), on the device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator, device=x.device)
    rows = torch.arange(h, device=x.device)[None] + dy[:, None]
    cols = torch.arange(w, device=x.device)[None] + dx[:, None]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch; none (a training set smaller than one batch, drop_last) is refused: an
    in-memory set used to shrink the batch to its size without a word."""
    steps = n // batch_size if drop_last else math.ceil(n / batch_size)
    if steps == 0:
        raise DataError(f"the training set has {n} samples, fewer than one batch of "
                        f"{batch_size}; lower data.batch_size")
    return steps


class TensorStream(BatchStream):
    """Batches of in-memory tensors kept on the device (no workers, no copies per step), with an
    optional random translation (``shift`` pixels) drawn on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device, seed: int = 0,
                 drop_last: bool = True, shift: int = 0):
        device = torch.device(device)
        self.shift = shift
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.x = x.to(device)
        self.y = y.to(device)
        self.n = x.shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.steps_per_epoch = _steps_per_epoch(self.n, batch_size, drop_last)
        self.epoch = 0
        self.position = 0
        self._order = None

    def next(self) -> tuple:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = _epoch_order(self.n, self.seed, self.epoch).to(self.x.device)
        start = self.position * self.batch_size
        index = self._order[start:start + self.batch_size]
        self.position += 1
        x = self.x[index]
        if self.shift:
            x = random_shift(x, self.shift, self.generator)
        return x, self.y[index]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._order = None


class _ResumableSampler(torch.utils.data.Sampler):
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self):
        return iter(_epoch_order(self.n, self.seed, self.epoch)[self.start:].tolist())

    def __len__(self):
        return self.n - self.start


class LoaderStream(BatchStream):
    """A DataLoader with workers, pinned memory and non-blocking copies; resumable order."""

    def __init__(self, dataset, batch_size: int, device, seed: int = 0, num_workers: int = 2,
                 drop_last: bool = True):
        self.device = torch.device(device)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.steps_per_epoch = _steps_per_epoch(len(dataset), batch_size, drop_last)
        self.sampler = _ResumableSampler(len(dataset), seed)
        self.epoch = 0
        self.position = 0
        self._iter = None

    def _start_epoch(self) -> None:
        self.sampler.epoch = self.epoch
        self.sampler.start = self.position * self.batch_size
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)  # worker seeds
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last, generator=g,
            persistent_workers=False, prefetch_factor=4 if self.num_workers > 0 else None)
        self._iter = iter(loader)

    def next(self) -> tuple:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._iter = None
        if self._iter is None:
            self._start_epoch()
        x, y = next(self._iter)
        self.position += 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iter = None

    def pause(self) -> None:
        """Shut the loader's workers and pin-memory thread down (a CUDA-graph capture in torch's
        "global" mode fails if another thread allocates pinned memory meanwhile); the next batch
        restarts the loader at the same position, as a resumed run does."""
        self._iter = None


class NoiseStream(BatchStream):
    """Random inputs of the data set's shape, drawn on the device (data-free distillation).

    ``uniform``: pixels uniform in [0, 1], then normalised like real inputs; ``gaussian``:
    standard normal in the normalised space (NeRN's ``RandomDataset``).
    """

    def __init__(self, shape: tuple, batch_size: int, device, seed: int = 0, kind: str = "uniform",
                 mean: tuple = (0.0,), std: tuple = (1.0,)):
        if kind not in ("uniform", "gaussian"):
            raise ValueError(f"noise kind '{kind}' is not 'uniform' or 'gaussian'")
        self.device = torch.device(device)
        self.shape = (batch_size,) + tuple(shape)
        self.kind = kind
        self.seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        c = shape[0]
        self.mean = torch.tensor(mean, device=self.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        self.std = torch.tensor(std, device=self.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        self.steps_per_epoch = 1
        self.labels = torch.full((batch_size,), -1, dtype=torch.long, device=self.device)

    def next(self) -> tuple:
        if self.kind == "uniform":
            x = torch.rand(self.shape, generator=self.generator, device=self.device)
            x = (x - self.mean) / self.std
        else:
            x = torch.randn(self.shape, generator=self.generator, device=self.device)
        return x, self.labels

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------------------ data sets
def load_digits(image_size: Optional[int] = None, split_seed: int = 0,
                test_fraction: float = 0.2) -> TaskData:
    """scikit-learn's digits: fixed seeded split, resized to ``image_size``, standardised."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataError("the digits data set ships with scikit-learn: pip install scikit-learn") from exc
    raw = sk_load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(raw.target, dtype=torch.long)
    size = image_size or 8
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(split_seed)
    order = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(x.shape[0] * test_fraction))
    if not 1 <= n_test <= x.shape[0] - 2:  # the training split's std needs two images
        raise DataError(f"data.test_fraction {test_fraction} leaves {n_test} test and "
                        f"{x.shape[0] - n_test} training images of the {x.shape[0]} digits; choose a "
                        f"fraction that leaves at least 1 and 2 (e.g. the default 0.2)")
    test, train = order[:n_test], order[n_test:]
    mean, std = float(x[train].mean()), float(x[train].std())
    x = (x - mean) / std
    return TaskData("digits", 10, (1, size, size), len(train), len(test), (mean,), (std,),
                    (x[train].contiguous(), y[train].contiguous()),
                    (x[test].contiguous(), y[test].contiguous()), True,
                    augment_shift=max(1, size // 8))


def _torchvision():
    try:
        import torchvision
        import torchvision.transforms as T
    except ImportError as exc:
        raise DataError("CIFAR and ImageNet data need torchvision: pip install torchvision") from exc
    return torchvision, T


def load_cifar(name: str, root: Optional[str], download: bool = True, augment: bool = True) -> TaskData:
    torchvision, T = _torchvision()
    root = Path(root or "data")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = [T.RandomHorizontalFlip(), T.RandomCrop(32, 4)] if augment else []
    train_tf = T.Compose(train_tf + [T.ToTensor(), normalize])
    test_tf = T.Compose([T.ToTensor(), normalize])
    try:
        train = cls(str(root), train=True, transform=train_tf, download=download)
        test = cls(str(root), train=False, transform=test_tf, download=download)
    except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError here
        folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        raise DataError(f"{name} is not under {root.resolve()} and could not be downloaded "
                        f"({type(exc).__name__}: {str(exc)[:160]}); put the extracted '{folder}' "
                        f"folder there, or set data.root to where it is") from exc
    classes = 10 if name == "cifar10" else 100
    return TaskData(name, classes, (3, 32, 32), len(train), len(test), IMAGENET_MEAN, IMAGENET_STD,
                    train, test, False)


def load_imagenet(root: str, image_size: Optional[int] = None, augment: bool = True) -> TaskData:
    torchvision, T = _torchvision()
    root = Path(root)
    size = image_size or 224
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"ImageNet: {root / split} is not a folder; data.root must hold train/ "
                            f"and val/ ImageFolders (one sub-folder per class)")
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if augment
                else [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)])
    train = torchvision.datasets.ImageFolder(str(root / "train"),
                                             T.Compose(train_tf + [T.ToTensor(), normalize]))
    test = torchvision.datasets.ImageFolder(str(root / "val"), T.Compose(
        [T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), normalize]))
    if train.classes != test.classes:  # labels are folder positions: the same names, or mixed labels
        only = sorted(set(train.classes) ^ set(test.classes))[:3]
        raise DataError(f"ImageNet: train/ has {len(train.classes)} class folders, val/ has "
                        f"{len(test.classes)}, and they must have the same names (labels are their "
                        f"sorted positions); in one only: {only}")
    return TaskData("imagenet", len(train.classes), (3, size, size), len(train), len(test),
                    IMAGENET_MEAN, IMAGENET_STD, train, test, False)


def load_task_data(cfg) -> TaskData:
    """The task of a :class:`nern_fast.config.DataConfig`."""
    if cfg.dataset == "digits":
        return load_digits(cfg.image_size, cfg.split_seed, cfg.test_fraction)
    if cfg.dataset in ("cifar10", "cifar100"):
        return load_cifar(cfg.dataset, cfg.root, cfg.download, cfg.augment)
    if cfg.dataset == "imagenet":
        return load_imagenet(cfg.root, cfg.image_size, cfg.augment)
    raise DataError(f"unknown data set '{cfg.dataset}'; choose one of {DATASETS}")
