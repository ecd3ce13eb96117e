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

A cache entry holds only tensors, strings and numbers and is read with `weights_only=True`: a
file dropped into the cache folder (or damaged) cannot run code when read, and one that does not
load is decoded again and replaced, never a traceback.

Odd files in a dataset do not stop a run: an image that cannot be decoded (truncated, not an image,
a decompression bomb, a header Pillow rejects) is left out and named, as long as they are a handful
(`MAX_UNREADABLE`); more than that means the folder is wrong, and loading stops naming them.
The dataset itself is never changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from saofu.errors import SaofuError
from saofu.pixels import to_rgb8  # the serving app's scaling too: served as trained

# Bumped when what a cache file holds changes, so entries in an older format are never read
# (format 1 stored absolute image paths: those of whichever copy was decoded first; format 2
# ignored EXIF orientation; format 3 pickled dataclasses, which only an unsafe load can read, and
# clipped 16-bit and float images; format 4 had no per-file stamps to reuse rows by).
CACHE_FORMAT = 5
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
# A class needs one image to train on and one to validate on when the val split is carved out of it.
MIN_IMAGES_TO_SPLIT = 2
# Unreadable images left out before loading refuses: a handful in a large dataset is the usual
# stray file; more (over 5 and over 1% of a split) means the folder holds something else.
MAX_UNREADABLE, MAX_UNREADABLE_SHARE = 5, 0.01


class UnreadableImage(SaofuError):
    """An image file that cannot be decoded: its path and Pillow's reason."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"unreadable image: {path} ({reason})")
        self.path, self.reason = path, reason


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
    # (path, why) of every image left out because it could not be decoded
    unreadable: list[tuple[str, str]] = field(default_factory=list)


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
    """One image as uint8 HWC pixels, upright, RGB, resized to `image_size`.

    Raises:
        UnreadableImage: the file cannot be decoded (named, with Pillow's reason).
    """
    try:
        with Image.open(path) as im:
            # Image.open refuses more than twice Pillow's pixel limit; between once and twice it
            # only warns, and decoding such an image costs gigabytes: refused the same.
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} pixels, over Pillow's limit of {limit:,} (decompression bomb?)")
            # Upright as the phone meant it, as the serving app decodes (deploy/decoding.py): a
            # photo stored sideways with an EXIF orientation trains as it is served.
            ImageOps.exif_transpose(im, in_place=True)
            im = to_rgb8(im)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image Pillow can read") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for odd files (ValueError,
        # TypeError, OSError, SyntaxError, DecompressionBombError, a warning turned error): all mean unusable
        raise UnreadableImage(path, f"{exc.__class__.__name__}: {exc}") from None


# An image an earlier cache entry holds: that entry's [N, 3, H, W] uint8 images and the row.
DecodedRow = tuple[torch.Tensor, int]


def decode_index(
    index: ImageFolderIndex, image_size: int, classes: list[str] | None = None,
    decoded_before: Callable[[Path], DecodedRow | None] | None = None,
) -> tuple[TensorSplit, list[tuple[str, str]]]:
    """Decode the images of `index` into one uint8 tensor, remapping labels onto `classes`.

    `decoded_before(path)` finds an image in an earlier cache entry that holds this very file
    (`_rows_decoded_before`), so a dataset that grew by a few images decodes only those: the rest
    are looked up here and copied over in one gather per entry tensor, and only the new files go
    to the decoding threads (one thread task and an HWC round trip per image made loading the
    bench's 17,000-image dataset grown by 2,890 take 4.3 s, now 2.3, of which 0.6 s is decoding).

    Returns:
        (the split, [(path, why)] of the images that could not be decoded and were left out).

    Raises:
        SaofuError: a class the training classes lack, or more unreadable images than a handful
            (`MAX_UNREADABLE`, `MAX_UNREADABLE_SHARE`), named.
    """
    classes = classes or index.classes
    unknown = sorted(set(index.classes) - set(classes))
    if unknown:
        raise SaofuError(f"classes {unknown} in {index.root} are not in the training classes {classes}")
    remap = [classes.index(c) for c in index.classes]
    samples = index.samples
    found = [decoded_before(p) for p, _ in samples] if decoded_before is not None else [None] * len(samples)
    missing = [i for i, f in enumerate(found) if f is None]

    def decode(path: Path) -> np.ndarray | str:
        try:
            return _decode(path, image_size)
        except UnreadableImage as exc:
            return exc.reason

    # PIL releases the GIL while decoding, so threads use both cores without pickling arrays.
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = dict(zip(missing, pool.map(decode, [samples[i][0] for i in missing]), strict=True))
    unreadable = [(str(samples[i][0]), why) for i, why in decoded.items() if isinstance(why, str)]
    if len(unreadable) > max(MAX_UNREADABLE, MAX_UNREADABLE_SHARE * len(samples)):
        # one line, as the CLI prints a SaofuError
        listed = "; ".join(f"{p} ({why})" for p, why in unreadable[:20])
        more = f"; and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        raise SaofuError(f"{len(unreadable)} of {len(samples)} images in {index.root} cannot be decoded, too many "
                         f"to leave out (at most {MAX_UNREADABLE} or {MAX_UNREADABLE_SHARE:.0%}): {listed}{more}")
    kept = [i for i in range(len(samples)) if not isinstance(decoded.get(i), str)]
    emptied = sorted({index.classes[y] for _, y in samples} - {index.classes[samples[i][1]] for i in kept})
    if emptied:
        raise SaofuError(f"no image of class {', '.join(map(repr, emptied))} in {index.root} can be decoded: "
                         + "; ".join(f"{p} ({why})" for p, why in unreadable[:10]))
    images = torch.empty((len(kept), 3, image_size, image_size), dtype=torch.uint8)
    gathers: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}  # per entry tensor: (it, rows, to)
    for k, i in enumerate(kept):
        if found[i] is None:
            images[k].numpy()[...] = decoded[i].transpose(2, 0, 1)  # HWC pixels into the CHW row
        else:
            source, row = found[i]
            _, rows, to = gathers.setdefault(id(source), (source, [], []))
            rows.append(row)
            to.append(k)
    for source, rows, to in gathers.values():
        images[torch.tensor(to)] = source[torch.tensor(rows)]
    labels = torch.tensor([remap[samples[i][1]] for i in kept], dtype=torch.int64)
    return TensorSplit(images, labels, list(classes), [str(samples[i][0]) for i in kept]), unreadable


def too_small_to_split(classes: list[str], labels: list[int], folder: Path) -> dict[str, int]:
    """The classes with fewer than `MIN_IMAGES_TO_SPLIT` images (name -> images): they are trained
    on but hold none out for validation.

    A class of one image stays in training rather than stopping the run (the release flow takes
    a small human-labelled folder's carved-out split as held-out data); only a split whose
    validation part would be empty is refused.

    Raises:
        SaofuError: no class can be split, naming them and the minimum.
    """
    counts = Counter(labels)
    small = {c: counts.get(i, 0) for i, c in enumerate(classes) if counts.get(i, 0) < MIN_IMAGES_TO_SPLIT}
    if len(small) == len(classes):
        named = ", ".join(f"{c!r} ({n} image{'s' if n != 1 else ''})" for c, n in small.items())
        raise SaofuError(
            f"nothing to validate on in {folder}: class {named}; a class needs at least {MIN_IMAGES_TO_SPLIT} "
            f"images to hold one out for validation: add images, or give the dataset a val/ folder "
            f"(DIR/train/<class>, DIR/val/<class>)"
        )
    return small


def _stratified_split(split: TensorSplit, share: float, seed: int) -> tuple[TensorSplit, TensorSplit]:
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in range(len(split.classes)):
        idx = torch.nonzero(split.labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        # at least one held out and one kept; a class of one image is kept for training
        n_held = min(max(1, round(len(idx) * share)), len(idx) - 1)
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
    rel = _relative_to(root)
    for split, folder in sorted(dataset_layout(root).items()):
        for path, _ in scan_imagefolder(folder).samples:
            st = os.stat(path)
            h.update(f"{split}|{rel(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
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
    cached = _read_cache(cache_file, root) if cache_file and cache_file.exists() else None
    if cached is not None:
        # A folder loaded from an entry another folder made (a copy of a dataset has the same
        # fingerprint) takes it as its own last entry too: without this a copy that then grew
        # found no rows to keep and decoded all of its images again.
        _remember_entry(Path(cache_dir), root, cache_file)
        with contextlib.suppress(OSError):
            os.utime(cache_file)  # used: an entry no existing folder names goes once unused an hour
        _report_unreadable(cached.unreadable)
        return cached

    before = _rows_decoded_before(Path(cache_dir), root, image_size) if cache_dir else None
    layout = dataset_layout(root)
    train_index = scan_imagefolder(layout["train"])
    if len(train_index.classes) < 2:
        raise SaofuError(f"need at least 2 classes to train, found {train_index.classes} in {layout['train']}")
    if "val" not in layout:  # before decoding: a dataset that cannot be split fails at once
        too_small_to_split(train_index.classes, [y for _, y in train_index.samples], layout["train"])
    train, unreadable = decode_index(train_index, image_size, decoded_before=before)
    classes = train.classes
    if "val" in layout:
        val, more = decode_index(scan_imagefolder(layout["val"]), image_size, classes, before)
        unreadable += more
    else:
        small = too_small_to_split(classes, train.labels.tolist(), layout["train"])  # without unreadable images
        if small:
            print(f"not validated (fewer than {MIN_IMAGES_TO_SPLIT} images, all used for training): "
                  + ", ".join(f"{c!r} ({n})" for c, n in small.items()), flush=True)
        train, val = _stratified_split(train, val_share, seed)
    test = None
    if "test" in layout:
        test, more = decode_index(scan_imagefolder(layout["test"]), image_size, classes, before)
        unreadable += more
    prepared = PreparedData(classes, train, val, test, fingerprint, str(root.resolve()), unreadable)
    _report_unreadable(unreadable)
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write to a private name, then rename (atomic): a killed run never leaves half a cache
        # file, and two runs preparing the same data at once don't trip over each other.
        tmp = cache_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        torch.save(_cache_payload(prepared, root, image_size), tmp)
        tmp.replace(cache_file)
        _remember_entry(Path(cache_dir), root, cache_file)
    return prepared


def _report_unreadable(unreadable: list[tuple[str, str]]) -> None:
    """Name the images left out, every time the dataset is loaded (a cache hit included)."""
    if unreadable:
        listed = "".join(f"\n  {p} ({why})" for p, why in unreadable[:20])
        more = f"\n  ... and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        print(f"left out {len(unreadable)} image(s) that cannot be decoded:{listed}{more}", flush=True)


def _stamp(path: str | Path) -> str:
    """What says a file is the one decoded before: its size and modification time (as the fingerprint)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _relative_to(root: Path) -> Callable[[str | Path], str]:
    """`p` relative to `root`, POSIX: a string slice for the paths a scan of `root` gives (0.006 s per
    12,000 against 0.05 as `Path.relative_to`, three times per load), the slow way for any other spelling."""
    prefix = str(root) + os.sep

    def rel(p: str | Path) -> str:
        s = str(p)
        if s.startswith(prefix) and os.sep == "/":
            return s[len(prefix):]
        return Path(p).relative_to(root).as_posix()

    return rel


def _cache_payload(prepared: PreparedData, root: Path, image_size: int) -> dict[str, Any]:
    """What a cache entry holds: tensors, strings and numbers only (so `weights_only=True` reads
    it), image paths relative to the dataset root (POSIX) with each file's stamp, no source."""
    rel = _relative_to(root)
    splits = {name: {"images": s.images, "labels": s.labels, "paths": [rel(p) for p in s.paths],
                     "stamps": [_stamp(p) for p in s.paths]}
              for name, s in (("train", prepared.train), ("val", prepared.val), ("test", prepared.test))
              if s is not None}
    return {"format": CACHE_FORMAT, "classes": list(prepared.classes), "fingerprint": prepared.fingerprint,
            "image_size": image_size, "splits": splits,
            "unreadable": [[rel(p), why] for p, why in prepared.unreadable]}


# The last entry written for each dataset folder: where a grown dataset finds the rows it can keep.
LAST_ENTRIES = "last-entries.json"


def _remember_entry(cache_dir: Path, root: Path, cache_file: Path) -> None:
    """Record `cache_file` as `root`'s last entry, and delete the entries nothing can hit any more.

    An entry is named by its folder's fingerprint, so once the folder changed only its own next
    load could have used the older one, and that load reads the newer one: without deleting it the
    cache grew by a dataset's worth with every ingest (3.7 GB of 204-MB entries after one
    fast-retrain bench). The entries of folders that are gone go too (`_delete_unnamed_entries`).
    An entry another folder still names as its last is kept. A process that was about to read a
    deleted entry decodes again (`_read_cache`, `_rows_decoded_before`).
    """
    index = cache_dir / LAST_ENTRIES
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    key = str(root.resolve())
    previous = entries.get(key)
    if previous == cache_file.name:
        return
    entries[key] = cache_file.name
    # Folders that are gone (a temporary folder, a dataset deleted or moved; an entry of the bench's
    # 17,000 images is 204 MB) are forgotten here, where the index is written anyway; their entries
    # then go unless used again.
    entries = {folder: name for folder, name in entries.items() if folder == key or os.path.isdir(folder)}
    tmp = index.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(index)
    _delete_unnamed_entries(cache_dir, set(entries.values()), previous)


# An entry (or temporary file) that no existing folder names is deleted once unused this long. Not
# at once: the folder may have moved (re-extracted elsewhere, its copy's next load hits the entry),
# or another process may have just written it and not yet recorded it (the index is not locked).
UNUSED_GRACE_S = 3600.0


def _delete_unnamed_entries(cache_dir: Path, named: set[str], moved_on_from: str | None) -> None:
    """Delete the entries no existing dataset folder names as its last, so the cache holds about
    one entry per dataset folder plus what was used within the last hour.

    At once: the entry a folder moved on from (`moved_on_from`, when no other folder names it).
    Once unused for `UNUSED_GRACE_S` (a hit touches its entry): those of folders that are gone,
    entries from before the index or of an older format, temporary files of killed runs. A process
    about to read a deleted entry decodes again.
    """
    now = time.time()
    for path in cache_dir.iterdir():
        name = path.name
        if name in named or not name.endswith((".pt", ".tmp")):
            continue
        try:
            if name == moved_on_from or now - path.stat().st_mtime > UNUSED_GRACE_S:
                path.unlink()
        except OSError:
            continue  # deleted by another process meanwhile


def _rows_decoded_before(cache_dir: Path, root: Path, image_size: int) -> Callable[[Path], DecodedRow | None] | None:
    """Pixels of files the last cache entry of this folder decoded and that are unchanged since.

    An ingest adds 2,900 images to a 14,000-image dataset: its new fingerprint misses the cache,
    and decoding all 17,000 again cost the fast retrain seconds inside its clock. A file is
    reused when the same relative path has the same size and modification time (the key the
    fingerprint itself uses), at the same image size; anything unreadable is decoded again.
    """
    try:
        name = json.loads((cache_dir / LAST_ENTRIES).read_text()).get(str(root.resolve()))
        payload = torch.load(cache_dir / name, map_location="cpu", weights_only=True) if name else None
    except Exception:  # noqa: BLE001 - no usable entry: decode everything, as without this
        return None
    if not payload or payload.get("format") != CACHE_FORMAT or payload.get("image_size") != image_size:
        return None
    rows: dict[tuple[str, str], DecodedRow] = {}
    for entry in payload["splits"].values():
        images = entry["images"]
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, image_size, image_size) or not (
                len(images) == len(entry["paths"]) == len(entry["stamps"])):
            return None
        for row, key in enumerate(zip(entry["paths"], entry["stamps"], strict=True)):
            rows[key] = (images, row)
    rel = _relative_to(root)

    def decoded_before(path: Path) -> DecodedRow | None:
        try:
            return rows.get((rel(path), _stamp(path)))
        except (OSError, ValueError):
            return None

    return decoded_before


def _read_cache(cache_file: Path, root: Path) -> PreparedData | None:
    """A cache entry's data with paths under `root`, the copy being loaded now; None when the
    entry cannot be read (damaged, another format, or holding objects a safe load refuses): the
    caller decodes again and replaces it."""
    try:
        payload = torch.load(cache_file, map_location="cpu", weights_only=True)
        if payload.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {payload.get('format')!r}")
        classes = [str(c) for c in payload["classes"]]

        base = str(root)

        def under_root(p: str) -> str:
            # `str(root / p)` in string operations (two Paths per image: 0.65 s per 50,000 against
            # 0.05), the same for the relative POSIX paths an entry holds, written by `as_posix()`.
            if p.startswith("/") or ".." in p.split("/"):  # an entry names files of its dataset only
                raise ValueError(f"path {p!r} outside the dataset")
            return p if base == "." else os.path.join(base, p)

        def split(entry: dict | None) -> TensorSplit | None:
            if entry is None:
                return None
            images, labels, paths = entry["images"], entry["labels"], entry["paths"]
            if images.dtype != torch.uint8 or labels.dtype != torch.int64 or not (
                len(images) == len(labels) == len(paths)
            ):
                raise ValueError("inconsistent split")
            return TensorSplit(images, labels, classes, [under_root(p) for p in paths])

        splits = payload["splits"]
        unreadable = [(under_root(p), str(why)) for p, why in payload["unreadable"]]
        return PreparedData(classes, split(splits["train"]), split(splits["val"]), split(splits.get("test")),
                            str(payload["fingerprint"]), str(root.resolve()), unreadable)
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, decoding again mends it
        print(f"decoded-image cache {cache_file} cannot be read ({exc.__class__.__name__}): decoding again",
              flush=True)
        return None


def iterate_batches(
    split: TensorSplit, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
):
    """Yield (uint8 images, labels) batches from tensors already in memory."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield split.images[idx], split.labels[idx]
