"""How layers are kept: the LayerBackend protocol (backend.py), its backends
(overlay/, plaindir.py) and layer diffs as OCI tars (ocidiff.py)."""
