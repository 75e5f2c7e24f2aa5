"""Layer storage: layers as OCI image-layer tars and back."""
