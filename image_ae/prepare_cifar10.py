"""Extract the CIFAR-10 JPEG tarballs into an ImageFolder tree usable as ``--dataset cifar10 --data-dir DEST``.

    python -m image_ae.prepare_cifar10 --src ../shared/data/cifar10 --dest data/cifar10_jpg

``cifar10_train.jpg.tar.gz`` holds ``train/<class>/NNNN.jpg`` and ``cifar10_test.jpg.tar.gz`` holds
``test/<class>/NNNN.jpg``.  When ``SRC/SHA256SUMS`` exists the tarballs are checked against it first.
Extraction refuses members that would land outside DEST (absolute paths, ``..``, links).
"""
import argparse
import hashlib
import os
import sys
import tarfile
from typing import List, Optional

from .data import CIFAR_TARBALLS, list_images


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(src: str, names) -> None:
    sums = os.path.join(src, "SHA256SUMS")
    if not os.path.isfile(sums):
        return
    expected = {}
    with open(sums) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                expected[parts[1].lstrip("*")] = parts[0]
    for name in names:
        if name in expected and sha256(os.path.join(src, name)) != expected[name]:
            raise SystemExit(f"checksum mismatch for {os.path.join(src, name)} (see {sums})")


def safe_extract(tar_path: str, dest: str) -> int:
    dest_abs = os.path.abspath(dest)
    n = 0
    with tarfile.open(tar_path, "r:*") as tar:
        members = []
        for m in tar.getmembers():
            target = os.path.abspath(os.path.join(dest_abs, m.name))
            if not (target == dest_abs or target.startswith(dest_abs + os.sep)) or m.issym() or m.islnk():
                raise SystemExit(f"refusing unsafe member {m.name!r} in {tar_path}")
            if not (m.isfile() or m.isdir()):
                continue
            members.append(m)
            n += m.isfile()
        try:
            tar.extractall(dest_abs, members=members, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(dest_abs, members=members)
    return n


def prepare(src: str, dest: str, force: bool = False) -> str:
    names = [t for t in CIFAR_TARBALLS if os.path.isfile(os.path.join(src, t))]
    if len(names) != len(CIFAR_TARBALLS):
        raise SystemExit(f"expected {' and '.join(CIFAR_TARBALLS)} in {src}")
    done = all(os.path.isdir(os.path.join(dest, s)) and list_images(os.path.join(dest, s)) for s in ("train", "test"))
    if done and not force:
        print(f"{dest} already holds train/ and test/; nothing to do (--force re-extracts)")
        return dest
    verify(src, names)
    os.makedirs(dest, exist_ok=True)
    for name in names:
        n = safe_extract(os.path.join(src, name), dest)
        print(f"extracted {n} files from {name}")
    return dest


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="folder holding the two tarballs (and SHA256SUMS)")
    p.add_argument("--dest", required=True, help="output ImageFolder root (gets train/ and test/)")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    prepare(a.src, a.dest, a.force)


if __name__ == "__main__":
    main(sys.argv[1:])
