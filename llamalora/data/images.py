"""A record's images: where its paths point, whether the files decode, and where they are when
they are not where the paths say."""

from __future__ import annotations

import os
from pathlib import Path

from llamalora.data.problems import Problem, excerpt
from llamalora.errors import UsageError, first_line

# Larger images are refused unread (a decompression bomb decodes to gigabytes). Mllama resizes
# every image to at most 4 tiles of 560x560 anyway.
MAX_IMAGE_PIXELS = 50_000_000
# Missing images whose folder is searched for (listing folders near the data costs a few ms
# each); later ones try the folder found last only.
_SEARCHES = 20
_LISTED = 200  # subfolders looked into per folder
_READ_CACHE = 10_000  # images whose verdict is remembered (one image often serves many turns)
GENERIC_FIX = "pass --image-root DIR, the folder relative image paths start from"


def resolve_image(name: str | os.PathLike, root: Path) -> Path:
    """Where an image path of a record (or chat's --image) points: absolute as given, relative
    under `root` (--image-root, by default the data file's folder)."""
    return Path(name) if os.path.isabs(name) else root / name


def image_root_folder(image_root: str | os.PathLike) -> Path:
    """`--image-root` as a folder that exists (`~` expanded).

    Raises:
        UsageError: It is not a folder.
    """
    folder = Path(image_root).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--image-root {image_root}: no such folder")
    return folder


def read_image(path: Path) -> None:
    """Opens and fully decodes an image, as training will; refuses decompression bombs
    (over MAX_IMAGE_PIXELS) before decoding them."""
    import warnings

    from PIL import Image  # only for data with images; keeps validate's start fast

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels is over the "
                                 f"{MAX_IMAGE_PIXELS:,}-pixel limit")
            im.load()


def image_error(exc: Exception) -> str:
    return first_line(exc)[:120]


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when near it."""
    relative = os.path.relpath(path)
    return str(path.absolute()) if relative.startswith(os.pardir + os.sep + os.pardir) \
        else relative


def _under(folder: Path, parts: tuple[str, ...], first: int = 0) -> tuple[Path, int] | None:
    """The file `parts` names under `folder`, with the fewest leading parts dropped (from
    `first` on), and how many were dropped."""
    for k in range(first, len(parts)):
        path = folder.joinpath(*parts[k:])
        if path.is_file():
            return path, k
    return None


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []
    return [folder / n for n in names[:_LISTED]]


class ImageRoot:
    """Where a record's relative image paths start: `folder` is --image-root (`given`) or the
    data file's folder. Under a given root, a path that is not there is tried without its
    leading folders (`demo/images/x.png`, then `images/x.png`, then `x.png`): a data set's
    paths often keep the prefix of the machine it was made on."""

    def __init__(self, folder: Path, given: bool, open_images: bool = True):
        self.folder, self.given, self.open_images = folder, given, open_images
        self._read: dict[Path, str] = {}
        self._last: Path | None = None  # the folder that held the last missing image
        self._searches = 0

    def find(self, name: str) -> Path | None:
        """The file a record's image path names, or None."""
        path = resolve_image(name, self.folder)
        if path.is_file():
            return path
        if self.given and not os.path.isabs(name):
            found = _under(self.folder, Path(name).parts, 1)
            return found[0] if found else None
        return None

    def read_error(self, path: Path) -> str:
        """Why the image can't be decoded ("" when it can); remembered per file."""
        if path not in self._read:
            try:
                read_image(path)
                error = ""
            except Exception as exc:  # PIL raises many types for bad files
                error = image_error(exc)
            if len(self._read) >= _READ_CACHE:
                self._read.clear()
            self._read[path] = error
        return self._read[path]

    def missing_fix(self, name: str) -> str:
        """What to pass so the missing image `name` is found: the folder near the data that
        holds it (searched for), or the generic advice."""
        found = None if os.path.isabs(name) else self._search(Path(name).parts)
        if found is None:
            return GENERIC_FIX
        folder, path, dropped = found
        fix = f"it is at {shown(path)}: pass --image-root {shown(folder)}"
        if dropped:
            fix += (f" (a path not found under --image-root is tried without its leading "
                    f"folders, here `{'/'.join(dropped)}/`)")
        return fix

    def _candidates(self):
        if not self.given:
            yield self.folder, 1  # the data's own folder, leading folders dropped
        parent = self.folder.absolute().parent
        yield from ((f, 0) for f in _subfolders(self.folder))
        yield parent, 0
        yield from ((f, 0) for f in _subfolders(parent) if f != self.folder.absolute())

    def _search(self, parts: tuple[str, ...]) -> tuple[Path, Path, tuple[str, ...]] | None:
        candidates = [(self._last, 0)] if self._last is not None else []
        if self._searches < _SEARCHES:
            self._searches += 1
            candidates = [*candidates, *self._candidates()]
        for folder, first in candidates:
            hit = _under(folder, parts, first)
            if hit is not None:
                path, dropped = hit
                self._last = folder
                return folder, path, parts[:dropped]
        return None

    def check(self, names: list[str], line: int, problems: list[Problem],
              field_name: str) -> list[Path]:
        """The files of a record's image paths; a missing or unreadable one is a problem."""
        if not self.open_images:
            return [resolve_image(name, self.folder) for name in names]
        paths = []
        for name in names:
            path = self.find(name)
            if path is None:
                problems.append(Problem(line, field_name, "image_missing",
                                        f"image not found: {resolve_image(name, self.folder)}",
                                        excerpt(name), fix=self.missing_fix(name)))
                continue
            error = self.read_error(path)
            if error:
                problems.append(Problem(line, field_name, "image_unreadable",
                                        f"image cannot be read: {path} ({error})",
                                        excerpt(name)))
                continue
            paths.append(path)
        return paths

    def relative_name(self, name: str, folder: Path) -> str:
        """A record's relative image path as seen from `folder` (where --fix writes its copy),
        so the copy finds the same file; an absolute path stays as it is."""
        if os.path.isabs(name):
            return name
        path = os.path.abspath(self.find(name) or resolve_image(name, self.folder))
        if os.path.abspath(folder / name) == path:
            return name  # already right from there
        return Path(os.path.relpath(path, folder.absolute())).as_posix()
