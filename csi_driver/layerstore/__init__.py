"""How layers are kept: the LayerBackend protocol (backend.py), the backends by name
(backends.py: overlay/, plaindir/) and layer diffs as OCI tars (layertar.py the format,
treediff.py diffs of whole trees, overlay/upperdiff.py an overlay upper's)."""
