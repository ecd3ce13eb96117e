"""ImageFolder datasets, decoded once into uint8 tensors.

Any image-classification dataset in ImageFolder layout goes through here, not only the Fu world:

    DIR/<class>/<image>                 one folder per class; a validation split is carved out
    DIR/train/<class>/... [val/ test/]  explicit splits (the layout `saofu data generate` writes)

Decoding PNG/JPEG is the slow part of training small models on a CPU, so images are decoded once,
resized to the model's input size, and cached as one tensor file keyed by the dataset's
fingerprint (file names relative to the dataset root, sizes and modification times). Later
epochs, runs and benchmark entries read tensors.

The key does not depend on where the dataset lies, so a dataset moved or extracted again elsewhere
(same files, same times) reuses its entry: the entry therefore stores image paths relative to the
dataset root, and a hit rebuilds them from the root being loaded, never from the first copy's.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from saofu.errors import SaofuError

# Bumped when what a cache file holds changes, so entries in an older format are never read
# (format 1 stored absolute image paths: those of whichever copy was decoded first; format 2
# ignored EXIF orientation).
CACHE_FORMAT = 3
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


@dataclass
class ImageFolderIndex:
    """Files of one ImageFolder tree: class names from folder names, sorted."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]


@dataclass
class TensorSplit:
    """One split decoded: `images` uint8 [N,3,H,W], `labels` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class PreparedData:
    """Train/val (and test, when the dataset has held-out data) splits, one class map."""

    classes: list[str]
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit | None
    fingerprint: str
    source: str


def scan_imagefolder(root: str | Path) -> ImageFolderIndex:
    """List an ImageFolder tree.

    Raises:
        SaofuError: the folder is missing, has no class folders, or a class folder has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SaofuError(f"dataset folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SaofuError(f"no class folders in {root} (ImageFolder layout: {root}/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    for idx, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise SaofuError(f"class folder has no images: {class_dir}")
        samples.extend((f, idx) for f in files)
    return ImageFolderIndex(root=root, classes=[d.name for d in class_dirs], samples=samples)


def _decode(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            # Upright as the phone meant it, as the serving app decodes (deploy/decoding.py): a
            # photo stored sideways with an EXIF orientation trains as it is served.
            ImageOps.exif_transpose(im, in_place=True)
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SaofuError(f"unreadable image: {path} ({exc.__class__.__name__})") from None


def decode_index(index: ImageFolderIndex, image_size: int, classes: list[str] | None = None) -> TensorSplit:
    """Decode every image of `index` into one uint8 tensor, remapping labels onto `classes`."""
    classes = classes or index.classes
    unknown = sorted(set(index.classes) - set(classes))
    if unknown:
        raise SaofuError(f"classes {unknown} in {index.root} are not in the training classes {classes}")
    remap = [classes.index(c) for c in index.classes]
    paths = [p for p, _ in index.samples]
    # PIL releases the GIL while decoding, so threads use both cores without pickling arrays.
    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(pool.map(lambda p: _decode(p, image_size), paths))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([remap[y] for _, y in index.samples], dtype=torch.int64)
    return TensorSplit(images, labels, list(classes), [str(p) for p in paths])


def _stratified_split(split: TensorSplit, share: float, seed: int) -> tuple[TensorSplit, TensorSplit]:
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in range(len(split.classes)):
        idx = torch.nonzero(split.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = max(1, round(len(idx) * share)) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])

    def take(parts: list[torch.Tensor]) -> TensorSplit:
        idx = torch.cat(parts).sort().values
        return TensorSplit(
            split.images[idx], split.labels[idx], split.classes, [split.paths[i] for i in idx.tolist()]
        )

    return take(keep), take(held)


def dataset_layout(root: Path) -> dict[str, Path]:
    """The split folders of a dataset: {'train': ..., 'val': ..., 'test': ...} where present."""
    if (root / "train").is_dir() and any(p.is_dir() for p in (root / "train").iterdir()):
        return {s: root / s for s in SPLITS if (root / s).is_dir()}
    return {"train": root}


def fingerprint_dataset(root: Path, image_size: int, val_share: float, seed: int) -> str:
    """A hash of what decoding depends on; stat() only, so it costs no image reads."""
    h = hashlib.sha256(json.dumps([image_size, val_share, seed]).encode())
    for split, folder in sorted(dataset_layout(root).items()):
        for path, _ in scan_imagefolder(folder).samples:
            st = path.stat()
            h.update(f"{split}|{path.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare_dataset(
    data_dir: str | Path,
    image_size: int = 64,
    val_share: float = 0.15,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> PreparedData:
    """Load an ImageFolder dataset as tensors, decoding only on a cache miss.

    Args:
        data_dir: ImageFolder root (flat or with train/val/test folders).
        image_size: side length images are resized to.
        val_share: share of each class held out for validation when there is no `val/` folder.
        seed: seed of that split.
        cache_dir: where decoded tensors are kept; None disables the cache.

    Returns:
        PreparedData with train, val and (if the dataset has one) test splits.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise SaofuError(f"dataset folder not found: {root}")
    if not 0.0 < val_share < 1.0:
        raise SaofuError(f"val_share must be between 0 and 1, got {val_share}")
    fingerprint = fingerprint_dataset(root, image_size, val_share, seed)
    cache_file = Path(cache_dir) / f"{fingerprint}.v{CACHE_FORMAT}.pt" if cache_dir else None
    if cache_file and cache_file.exists():
        return _rebase(torch.load(cache_file, weights_only=False), root)

    layout = dataset_layout(root)
    train_index = scan_imagefolder(layout["train"])
    if len(train_index.classes) < 2:
        raise SaofuError(f"need at least 2 classes to train, found {train_index.classes} in {layout['train']}")
    train = decode_index(train_index, image_size)
    classes = train.classes
    if "val" in layout:
        val = decode_index(scan_imagefolder(layout["val"]), image_size, classes)
    else:
        train, val = _stratified_split(train, val_share, seed)
    test = decode_index(scan_imagefolder(layout["test"]), image_size, classes) if "test" in layout else None
    prepared = PreparedData(classes, train, val, test, fingerprint, str(root.resolve()))
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write to a private name, then rename (atomic): a killed run never leaves half a cache
        # file, and two runs preparing the same data at once don't trip over each other.
        tmp = cache_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        torch.save(_relative_to(prepared, root), tmp)
        tmp.replace(cache_file)
    return prepared


def _map_paths(prepared: PreparedData, source: str, fn) -> PreparedData:
    def split(s: TensorSplit | None) -> TensorSplit | None:
        return None if s is None else replace(s, paths=[fn(p) for p in s.paths])

    return replace(prepared, train=split(prepared.train), val=split(prepared.val), test=split(prepared.test),
                   source=source)


def _relative_to(prepared: PreparedData, root: Path) -> PreparedData:
    """What a cache entry holds: image paths relative to the dataset root (POSIX), no source."""
    return _map_paths(prepared, "", lambda p: Path(p).relative_to(root).as_posix())


def _rebase(cached: PreparedData, root: Path) -> PreparedData:
    """A cache entry's splits with paths under `root`, the copy being loaded now."""
    return _map_paths(cached, str(root.resolve()), lambda p: str(root / p))


def iterate_batches(
    split: TensorSplit, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
):
    """Yield (uint8 images, labels) batches from tensors already in memory."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]
