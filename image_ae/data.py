"""Datasets for the image autoencoder: torchvision datasets and any ImageFolder tree, as uint8 tensors.

Every split is returned as an :class:`ImageTensorDataset` (``(N, C, S, S)`` uint8 in memory, or loaded
lazily from files with ``cache=False``); ``__getitem__`` gives a float image in [0, 1].

* ``cifar10`` / ``svhn`` / ``mnist`` / ``fashion-mnist``: torchvision's classes under ``--data-dir``
  (downloaded only with ``download=True``).  ``cifar10`` also accepts an ImageFolder tree
  ``D/train/<class>/*.jpg`` + ``D/test/<class>/*.jpg`` (the layout of the JPEG tarballs, see
  :mod:`image_ae.prepare_cifar10`).
* ``imagefolder``: ``D/<class>/<image>``; when ``D/train`` and ``D/test`` exist they are the splits,
  otherwise a held-out part is split off deterministically (independent of ``--seed``).

Images of any size and mode are resized (shorter side) and centre-cropped to ``image_size`` (images smaller
than ``image_size`` are upsampled); the number of channels is 1 when every image of the dataset is grayscale,
3 otherwise (or forced by ``channels``). Palette images are expanded through their palette; images with an
alpha channel (RGBA, LA, PA, or a palette / grayscale / RGB image with a transparent colour) are composited
onto black (premultiplied colour), and 16-bit / float grayscale is rescaled to 8 bits.

A file that cannot be decoded (not an image, corrupt or truncated, or a mode PIL cannot convert) raises
:class:`BadImageError` naming the file(s). With the cache, every such file of both splits is listed when the
dataset is loaded into memory. With ``cache=False``, files that PIL cannot identify are listed by the header
scan of ``channels=None``; any other bad file is reported when it is read.
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

DATASETS = ("cifar10", "svhn", "mnist", "fashion-mnist", "imagefolder")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
CIFAR_TARBALLS = ("cifar10_train.jpg.tar.gz", "cifar10_test.jpg.tar.gz")


class DatasetNotFoundError(RuntimeError):
    """A dataset is missing or unreadable; the message says how to get it."""


class BadImageError(DatasetNotFoundError):
    """Image file(s) that cannot be decoded; the message names every file (``paths`` holds them)."""

    def __init__(self, message: str, paths: Sequence[str] = ()):  # one-argument form: DataLoader workers re-raise
        super().__init__(message)
        self.paths = list(paths)


def _bad_images_message(bad: Sequence[Tuple[str, BaseException]], limit: int = 10) -> str:
    head = (f"cannot read image file {bad[0][0]!r}" if len(bad) == 1 else f"cannot read {len(bad)} image files")
    lines = [f"{head} (not an image, corrupt or truncated, or an image mode that cannot be converted):"]
    lines += [f"  {path}: {type(e).__name__}: {e}" for path, e in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    lines.append("Remove or replace " + ("this file" if len(bad) == 1 else "these files") + " (or re-create the "
                 "dataset) and run again.")
    return "\n".join(lines)


def bad_images_error(bad: Sequence[Tuple[str, BaseException]]) -> BadImageError:
    return BadImageError(_bad_images_message(bad), [path for path, _ in bad])


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
    """PIL image of any mode/size -> (channels, image_size, image_size) uint8 tensor.

    16-bit / float grayscale is rescaled to 8 bits; transparency (an alpha channel, or a transparent palette
    entry / colour) is composited onto black; then the image is converted to L or RGB, resized and cropped."""
    from PIL import Image

    if img.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L
    elif img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    img = _resize_crop(img, image_size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(path: str, channels: int, image_size: int) -> torch.Tensor:
    """Decode one file; any decoding failure becomes a :class:`BadImageError` that names the file."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes the whole file: a truncated / corrupt body fails here
            return pil_to_uint8(img, channels, image_size)
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ... for bad files
        raise bad_images_error([(path, e)]) from e


def image_mode(path: str) -> str:
    """The PIL mode from the file's header (not decoded); a file PIL cannot identify -> BadImageError."""
    from PIL import Image

    try:
        with Image.open(path) as img:  # reads the header only
            return img.mode
    except MemoryError:
        raise
    except Exception as e:
        raise bad_images_error([(path, e)]) from e


def _all_grayscale(paths: Sequence[str], stop_early: bool) -> Tuple[bool, List[Tuple[str, BaseException]]]:
    """Whether every file's header has a grayscale mode, and the files whose header cannot be read.
    ``stop_early``: stop at the first colour image (the unread files are checked when they are decoded)."""
    gray, bad = True, []
    for p in paths:
        try:
            mode = image_mode(p)
        except BadImageError as e:
            bad.append((p, e.__cause__ or e))
            continue
        if mode not in GRAY_MODES:
            gray = False
            if stop_early:
                break
    return gray, bad


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


def _materialize(ds: ImageTensorDataset, desc: str,
                 progress: bool) -> Tuple[ImageTensorDataset, List[Tuple[str, BaseException]]]:
    """Load every file of a lazy dataset into one uint8 tensor; also returns the files that cannot be decoded
    (their rows are left undefined: the caller raises)."""
    if ds.images is not None or len(ds) == 0:
        return ds, []
    from tqdm.auto import tqdm

    out = torch.empty(len(ds), ds.channels, ds.image_size, ds.image_size, dtype=torch.uint8)
    bad = []
    for i in tqdm(range(len(ds)), desc=f"loading {desc}", disable=not progress or len(ds) < 2000,
                  mininterval=2.0, leave=False):
        try:
            out[i] = ds.get_uint8(i)
        except BadImageError as e:  # keep going: report every unreadable file at once
            bad.append((ds.paths[i], e.__cause__ or e))
    return ImageTensorDataset(images=out, channels=ds.channels, image_size=ds.image_size), bad


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
        # with the cache, every file is decoded below, and every unreadable one is reported there, together
        # with those that fail only when decoded (truncated); without it, the header scan is the only
        # up-front check, so it reads every header and reports the files PIL cannot identify
        gray, bad = _all_grayscale(train_paths + test_paths, stop_early=cache)
        if bad and not cache:
            raise bad_images_error(bad)
        channels = 1 if gray else 3
    train = ImageTensorDataset(paths=train_paths, channels=channels, image_size=image_size)
    test = ImageTensorDataset(paths=test_paths, channels=channels, image_size=image_size)
    if cache:
        train, bad_train = _materialize(train, "train", progress)
        test, bad_test = _materialize(test, "test", progress)
        if bad_train or bad_test:
            raise bad_images_error(bad_train + bad_test)
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
            img = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if c == 1 else arr))  # uint8: L / RGB
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
