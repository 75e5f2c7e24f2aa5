"""``serve``'s flags become the engine's settings in one place (``ServeOptions.engine_config``):
each flag reaches the engine, and the flags' defaults are the engine's own."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from csi_driver.cli import build_parser, serve
from csi_driver.engine.capacity import CapacityPolicy
from csi_driver.engine.context import EngineConfig

MiB = 1 << 20
GiB = 1 << 30


def test_every_engine_flag_of_serve_reaches_the_engine_config(tmp_path: Path) -> None:
    argv = ["serve", "--state-dir", str(tmp_path), "--node-id", "node-7", "--max-volumes-per-node", "7"]
    argv += ["--max-volume-size", "3Gi", "--max-ephemeral-size", "5Mi", "--max-snapshots-per-volume", "4"]
    argv += ["--max-layer-depth", "9", "--default-fs-type", "xfs", "--insecure-registry", "reg.local:5000"]
    argv += ["--max-live-snapshot-copy", "2Mi", "--backend", "plaindir"]
    policy = CapacityPolicy(2.0)
    cfg = serve.options(build_parser().parse_args(argv), "", policy).engine_config()
    assert (cfg.state_dir, cfg.node_id, cfg.max_volumes, cfg.max_volume_size) == (
        tmp_path,
        "node-7",
        7,
        3 * GiB,
    )
    assert (cfg.max_ephemeral_size, cfg.max_snapshots_per_volume, cfg.max_depth) == (5 * MiB, 4, 9)
    assert (cfg.fs_type, cfg.insecure_registries, cfg.max_live_copy) == ("xfs", {"reg.local:5000"}, 2 * MiB)
    assert cfg.backend == "plaindir" and cfg.capacity is policy and cfg.space is None


def test_serve_without_flags_keeps_the_engines_defaults() -> None:
    cfg = serve.options(build_parser().parse_args(["serve"]), "", CapacityPolicy()).engine_config()
    own = EngineConfig(state_dir=cfg.state_dir, node_id=cfg.node_id)
    differs = {f.name for f in fields(EngineConfig) if getattr(cfg, f.name) != getattr(own, f.name)}
    # a served node bounds what a capture of a volume in use copies, and names its backend
    # (a state dir of another backend is refused at start); the bare engine does neither
    assert differs == {"max_live_copy", "backend"}
