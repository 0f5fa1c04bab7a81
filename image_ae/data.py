"""Datasets for the image autoencoder: torchvision datasets and any ImageFolder tree, as uint8 tensors.

Every split is returned as an :class:`ImageTensorDataset` (``(N, C, S, S)`` uint8 in memory, or loaded
lazily from files with ``cache=False``); ``__getitem__`` gives a float image in [0, 1].

* ``cifar10`` / ``svhn`` / ``mnist`` / ``fashion-mnist``: torchvision's classes under ``--data-dir``
  (downloaded only with ``download=True``).  ``cifar10`` also accepts an ImageFolder tree
  ``D/train/<class>/*.jpg`` + ``D/test/<class>/*.jpg`` (the layout of the JPEG tarballs, see
  :mod:`image_ae.prepare_cifar10`).
* ``imagefolder``: ``D/<class>/<image>``; when ``D/train`` and ``D/test`` exist they are the splits,
  otherwise a held-out part is split off deterministically (independent of ``--seed``).

Images of any size and mode are resized (shorter side) and centre-cropped to ``image_size``; the number of
channels is 1 when every image of the dataset is grayscale, 3 otherwise (or forced by ``channels``).
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("cifar10", "svhn", "mnist", "fashion-mnist", "imagefolder")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
CIFAR_TARBALLS = ("cifar10_train.jpg.tar.gz", "cifar10_test.jpg.tar.gz")


class DatasetNotFoundError(RuntimeError):
    """A dataset is missing or unreadable; the message says how to get it."""


@dataclass
class Splits:
    train: "ImageTensorDataset"
    test: "ImageTensorDataset"
    channels: int
    description: str


class ImageTensorDataset(Dataset):
    """Images as a uint8 tensor ``(N, C, S, S)`` (cached) or as a list of files read on demand."""

    def __init__(self, images: Optional[torch.Tensor] = None, paths: Optional[Sequence[str]] = None,
                 channels: int = 3, image_size: int = 32):
        if (images is None) == (paths is None):
            raise ValueError("give exactly one of images / paths")
        self.images = images
        self.paths = list(paths) if paths is not None else None
        self.channels = channels
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def get_uint8(self, index: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[index]
        return load_image(self.paths[index], self.channels, self.image_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.get_uint8(index).float().div_(255.0)


# ---------------------------------------------------------------------------------------------- image utils
def _resize_crop(img, image_size: int):
    """PIL image -> shorter side resized to image_size, centre crop image_size x image_size."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    return img


def pil_to_uint8(img, channels: int, image_size: int) -> torch.Tensor:
    """PIL image of any mode/size -> (channels, image_size, image_size) uint8 tensor."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        from PIL import Image

        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    img = img.convert("L" if channels == 1 else "RGB")
    img = _resize_crop(img, image_size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(path: str, channels: int, image_size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return pil_to_uint8(img, channels, image_size)


def image_mode(path: str) -> str:
    from PIL import Image

    with Image.open(path) as img:  # reads the header only
        return img.mode


def list_images(root: str) -> List[str]:
    """Files with an image extension under ``root/<class>/`` (any depth), sorted (deterministic)."""
    out = []
    for cls in sorted(os.listdir(root)):
        cdir = os.path.join(root, cls)
        if not os.path.isdir(cdir):
            continue
        for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):
                    out.append(os.path.join(dirpath, f))
    return out


def _materialize(ds: ImageTensorDataset, desc: str, progress: bool) -> ImageTensorDataset:
    """Load every file of a lazy dataset into one uint8 tensor."""
    if ds.images is not None or len(ds) == 0:
        return ds
    from tqdm.auto import tqdm

    out = torch.empty(len(ds), ds.channels, ds.image_size, ds.image_size, dtype=torch.uint8)
    for i in tqdm(range(len(ds)), desc=f"loading {desc}", disable=not progress or len(ds) < 2000,
                  mininterval=2.0, leave=False):
        out[i] = ds.get_uint8(i)
    return ImageTensorDataset(images=out, channels=ds.channels, image_size=ds.image_size)


# ---------------------------------------------------------------------------------------------- ImageFolder
def is_split_imagefolder(root: str) -> bool:
    return all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test"))


def held_out_split(n: int, fraction: float) -> Tuple[List[int], List[int]]:
    """Deterministic (fixed seed, independent of --seed) train / held-out index split of n items."""
    if n < 2:
        raise DatasetNotFoundError(f"an ImageFolder without train/ and test/ needs at least 2 images, found {n}")
    n_test = min(n - 1, max(1, int(round(n * fraction))))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345)).tolist()
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def imagefolder_splits(root: str, image_size: int, channels: Optional[int] = None, val_fraction: float = 0.1,
                       cache: bool = True, progress: bool = True, name: str = "imagefolder") -> Splits:
    if not root or not os.path.isdir(root):
        raise DatasetNotFoundError(
            f"{name}: data directory {root!r} does not exist. Point --data-dir at an ImageFolder root "
            "(D/<class>/<image>, or D/train/<class>/... and D/test/<class>/...)."
        )
    if is_split_imagefolder(root):
        train_paths, test_paths = list_images(os.path.join(root, "train")), list_images(os.path.join(root, "test"))
        how = f"ImageFolder {root} (train/ and test/ splits)"
        if not train_paths or not test_paths:
            raise DatasetNotFoundError(
                f"{name}: {root}/train or {root}/test holds no images in <class>/ subfolders "
                f"(extensions {', '.join(IMG_EXTENSIONS)})."
            )
    else:
        paths = list_images(root)
        if not paths:
            raise DatasetNotFoundError(
                f"{name}: no images found under {root}/<class>/ (extensions {', '.join(IMG_EXTENSIONS)}). "
                "An ImageFolder root holds one subfolder per class (or train/ and test/ split folders)."
            )
        tr, te = held_out_split(len(paths), val_fraction)
        train_paths, test_paths = [paths[i] for i in tr], [paths[i] for i in te]
        how = f"ImageFolder {root} (held-out split {len(test_paths)}/{len(paths)}, fraction {val_fraction})"
    if channels is None:
        gray = all(image_mode(p) in GRAY_MODES for p in train_paths + test_paths)
        channels = 1 if gray else 3
    train = ImageTensorDataset(paths=train_paths, channels=channels, image_size=image_size)
    test = ImageTensorDataset(paths=test_paths, channels=channels, image_size=image_size)
    if cache:
        train, test = _materialize(train, "train", progress), _materialize(test, "test", progress)
    return Splits(train, test, channels, f"{how}: {len(train)} train / {len(test)} test, {channels} channel(s)")


# ---------------------------------------------------------------------------------------------- torchvision
def _from_torchvision(ds, channels: Optional[int], native_channels: int, image_size: int) -> ImageTensorDataset:
    """torchvision dataset -> uint8 tensor, from its ``.data`` array (no per-image PIL round trip when possible)."""
    data = ds.data
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if data.ndim == 3:  # MNIST-like (N, H, W)
        data = data[:, None]
    elif data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # CIFAR (N, H, W, C)
        data = data.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(data)).to(torch.uint8)  # (N, C, H, W)
    c = channels or native_channels
    if x.shape[1] != c:
        if c == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # ITU-R 601-2 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        from PIL import Image

        out = torch.empty(len(x), c, image_size, image_size, dtype=torch.uint8)
        for i in range(len(x)):
            arr = x[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
            out[i] = pil_to_uint8(img, c, image_size)
        x = out
    return ImageTensorDataset(images=x.contiguous(), channels=c, image_size=image_size)


_HOW_TO_GET = {
    "cifar10": "pass --download to fetch it with torchvision into --data-dir, or give --data-dir an ImageFolder "
    "tree D/train/<class>/*.jpg + D/test/<class>/*.jpg (e.g. extracted from cifar10_train.jpg.tar.gz / "
    "cifar10_test.jpg.tar.gz with `python -m image_ae.prepare_cifar10 --src DIR_WITH_TARBALLS --dest D`)",
    "svhn": "pass --download to fetch train_32x32.mat / test_32x32.mat with torchvision into --data-dir "
    "(needs scipy), or use --dataset imagefolder",
    "mnist": "pass --download to fetch it with torchvision into --data-dir (it creates D/MNIST/raw)",
    "fashion-mnist": "pass --download to fetch it with torchvision into --data-dir (it creates D/FashionMNIST/raw)",
}


def torchvision_splits(name: str, root: str, image_size: int, channels: Optional[int], download: bool) -> Splits:
    import torchvision.datasets as tvd

    if not root:
        raise DatasetNotFoundError(f"{name}: --data-dir is required; {_HOW_TO_GET[name]}.")
    try:
        if name == "cifar10":
            tr, te, native = tvd.CIFAR10(root, train=True, download=download), tvd.CIFAR10(root, train=False), 3
        elif name == "svhn":
            tr = tvd.SVHN(root, split="train", download=download)
            te = tvd.SVHN(root, split="test", download=download)
            native = 3
        elif name == "mnist":
            tr, te, native = tvd.MNIST(root, train=True, download=download), tvd.MNIST(root, train=False), 1
        elif name == "fashion-mnist":
            tr = tvd.FashionMNIST(root, train=True, download=download)
            te, native = tvd.FashionMNIST(root, train=False), 1
        else:
            raise ValueError(name)
    except (RuntimeError, OSError, ImportError) as e:
        if isinstance(e, ImportError):
            raise DatasetNotFoundError(f"{name}: cannot read the dataset ({e}).") from e
        raise DatasetNotFoundError(
            f"{name}: dataset not found or corrupted under --data-dir {root!r} ({e}). To get it: {_HOW_TO_GET[name]}."
        ) from e
    train = _from_torchvision(tr, channels, native, image_size)
    test = _from_torchvision(te, channels, native, image_size)
    return Splits(train, test, train.channels,
                  f"torchvision {name} in {root}: {len(train)} train / {len(test)} test, {train.channels} channel(s)")


# ---------------------------------------------------------------------------------------------- entry point
def _has_torchvision_cifar(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "cifar-10-batches-py", "data_batch_1"))


def build_splits(dataset: str, data_dir: Optional[str], image_size: int = 32, channels: Optional[int] = None,
                 download: bool = False, val_fraction: float = 0.1, cache: bool = True,
                 progress: bool = True) -> Splits:
    """The train and evaluation splits of ``dataset`` (see the module docstring)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if dataset == "imagefolder":
        return imagefolder_splits(data_dir, image_size, channels, val_fraction, cache, progress)
    if dataset == "cifar10" and data_dir:
        if os.path.basename(os.path.normpath(data_dir)) == "cifar-10-batches-py" and _has_torchvision_cifar(
                os.path.dirname(os.path.normpath(data_dir))):
            data_dir = os.path.dirname(os.path.normpath(data_dir))
        if not _has_torchvision_cifar(data_dir) and os.path.isdir(data_dir):
            if is_split_imagefolder(data_dir):
                return imagefolder_splits(data_dir, image_size, channels, val_fraction, cache, progress,
                                          name="cifar10")
            if any(os.path.isfile(os.path.join(data_dir, t)) for t in CIFAR_TARBALLS) and not download:
                raise DatasetNotFoundError(
                    f"cifar10: {data_dir} holds the JPEG tarballs, not an extracted dataset. Extract them with "
                    f"`python -m image_ae.prepare_cifar10 --src {data_dir} --dest SOME_DIR` and pass "
                    "--data-dir SOME_DIR."
                )
    return torchvision_splits(dataset, data_dir, image_size, channels, download)
