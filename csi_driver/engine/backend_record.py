"""Which layer backend a state dir's layers are kept with, recorded in the state dir.

One backend cannot read another's layers (each keeps them its own way below the state
dir), so a state dir that holds layers is served only with the backend that made them:
a changed ``--backend`` is refused at start instead of leaving every volume unusable. A
state dir without layers may change backend. A state dir from before the record existed
was made with the overlay backend, the only one then.
"""

from __future__ import annotations

import os
from pathlib import Path

from csi_driver.engine.context import BadConfig
from csi_driver.layerstore.backends import DEFAULT
from csi_driver.store import Store

FILE = "backend"


def choose(root: Path, asked: str, store: Store) -> str:
    """The backend to serve ``root`` with: ``asked`` ('' for the recorded one, or the
    default), recorded for the next start. BadConfig when the state dir holds layers
    of another backend."""
    path = root / FILE
    try:
        recorded = path.read_text().strip()
    except FileNotFoundError:
        recorded = ""
    chosen = asked or recorded or DEFAULT
    if chosen == recorded:
        return chosen
    with store.read() as tx:
        has_layers = tx.has_layers()
    made_with = recorded or (DEFAULT if has_layers else "")
    if has_layers and made_with != chosen:
        raise BadConfig(
            f"state dir {root} holds layers kept with the {made_with} backend, which the "
            f"{chosen} backend cannot read: serve it with --backend {made_with}, or use another --state-dir"
        )
    tmp = path.with_name(FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(chosen + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return chosen
