"""The plain-directory layer backend (see backend.py): for development clusters, it
enforces no capacity."""

from csi_driver.layerstore.plaindir.backend import CAPABILITIES, DIR, PlainDirBackend

__all__ = ["CAPABILITIES", "DIR", "PlainDirBackend"]
