"""Overlay mount composition: a pure function from metadata to mount options."""

from __future__ import annotations

PAGE_SIZE = 4096


class OptionsTooLong(ValueError):
    pass


def overlay_options(lower_links: list[str], upper_id: str | None) -> list[str]:
    """Options for an overlay whose lowers are ``l/<link>`` (nearest first).

    Paths are relative to the state dir (the mount runs with it as cwd), so the
    option string length depends only on the depth, never on where the state
    dir lives. ``upper_id`` None gives a read-only overlay of the lowers.
    """
    lowers = [f"l/{link}" for link in lower_links] + ["empty"]
    opts = [f"lowerdir={':'.join(lowers)}"]
    if upper_id is not None:
        opts += [f"upperdir=layers/{upper_id}/mnt/upper", f"workdir=layers/{upper_id}/mnt/work"]
    opts += ["index=off", "metacopy=off", "redirect_dir=on"]
    if len(",".join(opts)) >= PAGE_SIZE:
        raise OptionsTooLong(f"overlay options for {len(lower_links)} layers exceed one page")
    return opts


def view_options(links: list[str]) -> list[str]:
    """Options for a read-only overlay of two or more committed layers (nearest first)."""
    opts = overlay_options(links[:-1], None)
    opts[0] = "lowerdir=" + ":".join(f"l/{x}" for x in links)  # the last link replaces "empty"
    return opts
