"""A file proven unchanged between two captures of one upper without reading it.

A capture of a volume in use clones the upper's image (``capture``): where the
state dir's file system clones, the two images share every block the volume did
not write in between, and a file the volume did not touch sits at the same
offsets of both images. So when a file's extents are at the same offsets in both
images, and at each of those offsets the two images map to the same block of
the host disk, the file holds the same bytes in both. Anything else (a copy
that shares no block, inline data, no extent map) proves nothing, and the
caller compares the contents.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from csi_driver import host


def same_blocks(old_file: str, new_file: str, old_image: Path, new_image: Path) -> bool:
    """Whether ``old_file`` (a file of the file system in ``old_image``) and ``new_file``
    (of ``new_image``) are proven to hold the same bytes by where they are stored."""
    try:
        runs = host.data_map(old_file)
        if runs != host.data_map(new_file):
            return False
        for _offset, physical, length, _unwritten in runs:
            if host.data_map(old_image, physical, length) != host.data_map(new_image, physical, length):
                return False
    except OSError:
        return False
    return True


def upper_file(upper: Path, rel: str) -> str | None | bool:
    """What the upper holds at ``rel``: the path of a regular file, None for nothing,
    False for anything else (a whiteout, a directory on the way)."""
    path = os.path.join(upper, rel)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return path if stat.S_ISREG(st.st_mode) else False
