"""The JSON schema an image manifest (OCI or Docker schema 2) must meet before any
field of it is read: the shape of the OCI image spec's ``image-manifest-schema.json``
and ``content-descriptor.json``, narrowed to what this driver reads."""

from __future__ import annotations

from typing import Any

_DESCRIPTOR: dict[str, Any] = {
    "type": "object",
    "required": ["mediaType", "size", "digest"],
    "properties": {
        "mediaType": {"type": "string", "maxLength": 255},
        "size": {"type": "integer", "minimum": 0},
        "digest": {"type": "string", "pattern": r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$"},
        "urls": {"type": "array", "items": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

MANIFEST: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "image manifest",
    "type": "object",
    "required": ["schemaVersion", "config", "layers"],
    "properties": {
        "schemaVersion": {"type": "integer", "minimum": 2, "maximum": 2},
        "mediaType": {"type": "string"},
        "artifactType": {"type": "string"},
        "config": _DESCRIPTOR,
        "layers": {"type": "array", "items": _DESCRIPTOR},
        "subject": _DESCRIPTOR,
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
