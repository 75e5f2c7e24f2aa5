"""The overlay-on-loop-images layer backend (see backend.py)."""
