"""How layers are kept: the LayerBackend protocol (backend.py), its backends
(overlay/, plaindir.py) and layer diffs as OCI tars (layertar.py the format,
treediff.py diffs of whole trees, overlay/upperdiff.py an overlay upper's)."""
