"""WebDataset tar shards as a dataset: each sample's image located once (shard, byte offset,
size) with its label, then read by offset in the order of folder.epoch_order, as an ImageFolder
tree's files are.

The format, as WebDataset writes it: a sample is the members of one key in a tar, the key being a
member's path up to the first dot of its file name and the extension the rest:
- `<key>.jpg`, `<key>.jpeg` or `<key>.png` (exactly one, any case): the encoded image;
- `<key>.cls`: its class index as decimal text ("7"; whitespace around it is allowed);
- any other member of the key (`.json`, `.txt`, ...) is ignored, as are members that are not
  regular files, whose file name starts with a dot (as DALI's reader does) or holds none.
`classes.txt` beside the first shard, if there, names the classes, one a line (line i: class i);
without it the classes are "0" ... up to the largest index found.

Both backends read a sample's bytes by offset (ShardIndex.read) in the order the loader's epoch
order asks for, and DALI gets them through its external source, as it gets an ImageFolder's
files. DALI's own WebDataset reader (fn.readers.webdataset) cannot give the same batches: it
reads its archives in stored order, shuffles only within a buffer of `initial_fill` samples by
its own RNG, and splits them into contiguous ranges per rank (num_shards/shard_id); it takes no
order from outside, so its batches could match neither torchvision's nor a resumed run's.

Locating the samples takes one pass over each shard's tar headers (and its .cls members): the
result is cached as <shard stem>.index.json beside the shard, or, where that folder cannot be
written, in `cache_dir`; it is used while the shard's size and modification time are those it
was made from, and made anew otherwise. `directclr prepare shards` writes it with the shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .folder import ImageFolderIndex
from .images import CorruptImageError
from .prepare import with_progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
LABEL_EXTENSION = "cls"
CLASSES_FILE = "classes.txt"
INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "directclr shard index 1"
# Shards whose index is read or made at once: each read on shared storage waits a round trip,
# which threads overlap.
INDEX_THREADS = 8
KEY_DIGITS = 8  # prepared keys: the image's position in the ImageFolder tree, zero-padded
SHARD_DIGITS = 6
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """The paths a WebDataset shard pattern names, as braceexpand (and bash) expand it:
    `{0000..0099}` counts (zero-padded to the wider bound where a bound is), `{a,b}` lists;
    several braces vary the leftmost slowest. Other braces stay as written; nested braces are
    not expanded."""
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    head, body, tail = pattern[:found.start()], found.group(1), pattern[found.end():]
    counted = _RANGE.fullmatch(body)
    if counted:
        bounds = counted.groups()
        first, last = int(bounds[0]), int(bounds[1])
        padded = any(len(bound) > 1 and bound.startswith("0") for bound in bounds)
        width = max(len(bound) for bound in bounds) if padded else 0
        step = 1 if last >= first else -1
        values = [f"{n:0{width}d}" for n in range(first, last + step, step)]
    elif "," in body:
        values = body.split(",")
    else:
        values = ["{" + body + "}"]
    return [head + value + rest for value in values for rest in expand_braces(tail)]


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with `pattern` (.tar shards, brace-expanded) as --data, or None."""
    paths = expand_braces(os.path.expanduser(pattern))
    missing = [path for path in paths if not os.path.isfile(path)]
    if not missing:
        return None
    if len(paths) == 1:
        return f"{pattern}: no such file"
    if len(missing) == len(paths):
        return f"{pattern}: none of its {len(paths)} .tar files exists (first: {missing[0]})"
    return (f"{pattern}: {len(missing)} of its {len(paths)} .tar files do not exist (first: "
            f"{missing[0]})")


def is_shard_data(data) -> bool:
    """Whether `data` names WebDataset shards: a path ending in .tar (a brace pattern or one
    file), or a directory holding .tar files; one that holds folders too is an error, as it
    could be either."""
    text = os.fspath(data)
    if text.endswith(".tar"):
        return True
    root = Path(text).expanduser()
    if not any(path.is_file() for path in root.glob("*.tar")):
        return False
    folders = [path.name for path in root.iterdir()
               if path.is_dir() and not path.name.startswith(".")]
    if folders:
        raise ValueError(f"{root} holds both .tar files and folders ({folders[0]}, ...): name "
                         f"the shards with a pattern ({root}/NAME-{{0000..0099}}.tar), or move "
                         "the .tar files out of the ImageFolder tree")
    return True


def shard_paths(data) -> list[Path]:
    """The shards `data` names: a pattern's in its order, a directory's .tar files sorted."""
    text = os.fspath(data)
    if text.endswith(".tar"):
        problem = pattern_problem(text)
        if problem:
            raise FileNotFoundError(problem)
        return [Path(path) for path in expand_braces(os.path.expanduser(text))]
    shards = sorted(path for path in Path(text).expanduser().glob("*.tar") if path.is_file())
    if not shards:
        raise FileNotFoundError(f"{text} holds no .tar shards")
    return shards


def _index_paths(shard: Path, cache_dir) -> list[Path]:
    """Where the shard's index may be cached: beside it first, then in `cache_dir`."""
    paths = [shard.with_name(shard.stem + INDEX_SUFFIX)]
    if cache_dir is not None:
        # One cache for shards of any folder: named by the shard's absolute path.
        digest = hashlib.sha256(str(shard.resolve()).encode()).hexdigest()[:16]
        paths.append(Path(cache_dir).expanduser() / f"{digest}-{shard.stem}{INDEX_SUFFIX}")
    return paths


def _stamp(shard: Path) -> dict:
    """What a cached index must have been made from."""
    stat = shard.stat()
    return {"format": INDEX_FORMAT, "shard_bytes": stat.st_size,
            "shard_mtime_ns": stat.st_mtime_ns}


def cached_index(shard: Path, cache_dir=None) -> dict | None:
    """The shard's cached index, if one is current."""
    stamp = _stamp(shard)
    for path in _index_paths(shard, cache_dir):
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if all(cached.get(name) == value for name, value in stamp.items()):
            return cached
    return None


def build_index(shard: Path, cache_dir=None) -> dict:
    """The shard's index from one pass over it ({"keys", "offsets", "sizes", "labels"} in
    member order, and its stamp), cached in the first place that can be written."""
    stamp = _stamp(shard)
    index = {**stamp, **_scan(shard)}
    text = json.dumps(index)
    for path in _index_paths(shard, cache_dir):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: tmp.write_text(text))
            return index
        except OSError as err:
            log.debug("cannot cache the index of %s as %s: %s", shard, path, err)
    log.warning("cannot cache the index of %s beside it%s: it is made anew at every start",
                shard, "" if cache_dir is None else f" or in {cache_dir}")
    return index


def _scan(shard: Path) -> dict:
    """Every sample's image (offset, size) and label, in the order of their keys' first
    members; errors name the shard and the key."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    label_texts: dict[str, bytes] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                folder, _, file_name = member.name.rpartition("/")
                if not member.isfile() or file_name.startswith(".") or "." not in file_name:
                    continue
                stem, extension = file_name.split(".", 1)
                key, extension = (f"{folder}/{stem}" if folder else stem), extension.lower()
                parts = members.setdefault(key, {})
                if extension in parts:
                    raise ValueError(f"{shard} (key {key}): two .{extension} members")
                parts[extension] = member
                if extension == LABEL_EXTENSION:
                    label_texts[key] = tar.extractfile(member).read()
    except tarfile.TarError as err:
        raise ValueError(f"{shard} is not a readable tar: {err}") from err
    if not members:
        raise ValueError(f"{shard} holds no samples")
    index = {"keys": [], "offsets": [], "sizes": [], "labels": []}
    for key, parts in members.items():
        images = [parts[extension] for extension in IMAGE_EXTENSIONS if extension in parts]
        if len(images) != 1:
            raise ValueError(f"{shard} (key {key}): {len(images)} images, where a sample has "
                             f"one .jpg, .jpeg or .png")
        if key not in label_texts:
            raise ValueError(f"{shard} (key {key}): no .{LABEL_EXTENSION} member (the class "
                             "index as text)")
        try:
            label = int(label_texts[key].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if label < 0:
            raise ValueError(f"{shard} (key {key}): .{LABEL_EXTENSION} holds "
                             f"{label_texts[key][:20]!r}, not a class index (an integer >= 0)")
        index["keys"].append(key)
        index["offsets"].append(images[0].offset_data)
        index["sizes"].append(images[0].size)
        index["labels"].append(label)
    return index


class ShardIndex:
    """The samples of WebDataset shards, shard by shard in member order, with their labels:
    the counterpart of an ImageFolderIndex for the loaders (len, labels, classes, name, read).

    data: a .tar path or brace pattern (`shards/train-{0000..0099}.tar`), or a directory whose
    .tar files are taken in sorted order. cache_dir: where shard indexes go when the shards'
    folder cannot be written.
    """

    def __init__(self, data, cache_dir=None):
        self.shards = [str(path) for path in shard_paths(data)]
        paths = [Path(shard) for shard in self.shards]
        with ThreadPoolExecutor(INDEX_THREADS, thread_name_prefix="shard-index") as pool:
            indexes = list(pool.map(lambda shard: cached_index(shard, cache_dir), paths))
            missing = [i for i, index in enumerate(indexes) if index is None]
            if missing:
                log.info("indexing %d of %d shards: one pass over their tar headers, cached for "
                         "later starts", len(missing), len(paths))
                for i, index in zip(missing, pool.map(
                        lambda i: build_index(paths[i], cache_dir), missing)):
                    indexes[i] = index
        self.keys = [key for index in indexes for key in index["keys"]]
        self.labels = [label for index in indexes for label in index["labels"]]
        self.offsets = np.concatenate([np.asarray(index["offsets"], dtype=np.int64)
                                       for index in indexes])
        self.sizes = np.concatenate([np.asarray(index["sizes"], dtype=np.int64)
                                     for index in indexes])
        self.shard_of = np.repeat(np.arange(len(indexes), dtype=np.int32),
                                  [len(index["keys"]) for index in indexes])
        self.classes = self._class_names(paths[0].parent / CLASSES_FILE)

    def _class_names(self, path: Path) -> list[str]:
        top = max(self.labels)
        if not path.is_file():
            return [str(label) for label in range(top + 1)]
        classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if top >= len(classes):
            raise ValueError(f"{self.name(self.labels.index(top))}: class {top}, but {path} "
                             f"names {len(classes)} classes")
        return classes

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, i: int) -> str:
        """What errors call sample i: its shard and key."""
        return f"{self.shards[self.shard_of[i]]} (key {self.keys[i]})"

    def read(self, i: int) -> bytes:
        """Sample i's encoded image, read by offset."""
        size = int(self.sizes[i])
        with open(self.shards[self.shard_of[i]], "rb", buffering=0) as f:
            data = os.pread(f.fileno(), size, int(self.offsets[i]))
        if len(data) < size:
            raise CorruptImageError(self.name(i), f"the shard ends {size - len(data)} bytes "
                                    "into the image (changed since it was indexed?)")
        return data


def write_shards(root, out, shard_size: int, seed: int = 0, progress: bool = True) -> list[Path]:
    """Writes the images of the ImageFolder tree `root` as WebDataset shards
    out/shard-000000.tar, ... of `shard_size` samples (the last may hold fewer), in an order
    shuffled by `seed` so that a reader that goes through them in order (WebDataset's, DALI's)
    meets every class in every shard; with out/classes.txt and each shard's index. A sample's
    key is its image's position in ImageFolderIndex(root), zero-padded."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    index = ImageFolderIndex(root)
    foreign = [path for path in index.files
               if Path(path).suffix.lower()[1:] not in IMAGE_EXTENSIONS]
    if foreign:
        raise ValueError(f"{foreign[0]}: shards hold .jpg, .jpeg and .png images only "
                         f"({len(foreign)} other files under {root})")
    out = Path(out)
    if any(out.glob("*.tar")):
        raise ValueError(f"{out} holds .tar files already, and a folder of shards is read "
                         "whole: write into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / CLASSES_FILE,
                 lambda tmp: tmp.write_text("".join(f"{name}\n" for name in index.classes)))
    order = np.random.default_rng(seed).permutation(len(index)).tolist()
    starts = range(0, len(order), shard_size)
    shards = []
    for number, start in enumerate(with_progress(starts, "shards", progress, unit="shard")):
        shard = out / f"shard-{number:0{SHARD_DIGITS}d}.tar"
        atomic_write(shard, lambda tmp: _write_tar(tmp, index, order[start:start + shard_size]))
        build_index(shard)
        shards.append(shard)
    return shards


def _write_tar(path: Path, index: ImageFolderIndex, samples: list[int]) -> None:
    # ustar: the format every tar reader knows (keys are short); members dated 0, so that the
    # same tree and seed give the same bytes.
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in samples:
            key = f"{i:0{KEY_DIGITS}d}"
            image_extension = Path(index.files[i]).suffix.lower()[1:]
            for extension, data in ((LABEL_EXTENSION, str(index.labels[i]).encode()),
                                    (image_extension, index.read(i))):
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
