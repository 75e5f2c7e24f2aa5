"""Layers that travel: OCI references, a checked registry client, transfer progress."""
