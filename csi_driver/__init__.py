"""overlay-csi: a CSI driver whose volumes are stacks of copy-on-write layers."""

__version__ = "0.1.0"
