"""How layers are kept: the LayerBackend protocol (backend.py), the backends by name
(backends.py: overlay/, plaindir/) and layer diffs as OCI tars (ocidiff.py)."""
