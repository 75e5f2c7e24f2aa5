"""The Kubernetes API, for the few things only it can carry between instances of the
driver: a VolumeAttributesClass change from the central resizer to the node that holds
the volume (``modify_relay``), and pre-provisioned snapshot contents handed to the
registry snapshotter (``contents``). ``api`` is the one place that talks to the API server."""
