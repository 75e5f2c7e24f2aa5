"""Facts about the Dockerfile that can be checked without a docker engine.

The base is a Debian slim Python image; the build is multi-stage (wheels in a
builder, installed offline in the runtime stage); every host tool the node
plugin runs comes from a Debian package the runtime stage installs; the
ENTRYPOINT is the console script pyproject.toml declares.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

# Which Debian (bookworm) package ships each host tool. Checked against
# `dpkg -S` where the tool is installed on the test machine.
DEBIAN_PACKAGE_OF = {
    "mount": "mount",
    "umount": "mount",
    "losetup": "mount",
    "fsfreeze": "util-linux",
    "blockdev": "util-linux",
    "findmnt": "util-linux",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "blkid": "util-linux",
    "mkfs.ext4": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "tune2fs": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_growfs": "xfsprogs",
    "xfs_repair": "xfsprogs",
    "xfs_io": "xfsprogs",
}
# The tools the node plugin is specified to call (mount/unmount, loop devices,
# freeze for snapshots, mkfs/grow/check for ext4 and xfs, device sizes, the
# mount table).
REQUIRED_TOOLS = {
    "mount", "umount", "losetup", "fsfreeze", "mkfs.ext4", "mkfs.xfs", "resize2fs",
    "xfs_growfs", "e2fsck", "blockdev", "findmnt",
}
# Python-side programs that are not host tools.
NOT_HOST_TOOLS = {"overlay-csi", "python", "python3"}


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def run_commands(self) -> list[str]:
        return [args for op, args in self.instructions if op == "RUN"]


def logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments, as docker does."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse(text: str) -> tuple[list[Stage], dict[str, str], list[tuple[str, str]]]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    top: list[tuple[str, str]] = []
    for line in logical_lines(text):
        op, _, rest = line.partition(" ")
        op = op.upper()
        rest = rest.strip()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
            continue
        if op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, alias))
            continue
        (stages[-1].instructions if stages else top).append((op, rest))
    return stages, args, top


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Stage], dict[str, str]]:
    assert DOCKERFILE.is_file(), "Dockerfile is missing at the repository root"
    stages, args, top = parse(DOCKERFILE.read_text())
    assert not top, f"instructions before the first FROM: {top}"
    return stages, args


def apt_packages(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for cmd in stage.run_commands():
        for part in re.split(r"&&|;|\|\|", cmd):
            words = shlex.split(part)
            if len(words) >= 2 and words[0] in ("apt-get", "apt") and "install" in words:
                after = words[words.index("install") + 1:]
                packages.update(w.split("=")[0] for w in after if not w.startswith("-"))
    return packages


def console_scripts() -> dict[str, str]:
    if not PYPROJECT.is_file():
        return {"overlay-csi": "csi_driver.cli:main"}
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return project.get("scripts", {})


def tools_called_by_the_code() -> set[str]:
    """First element of every literal argv the package hands to a process."""
    pattern = re.compile(
        r"""(?:\brun|subprocess\.(?:run|Popen|check_output|check_call|call)|\bargv\s*=)\s*\(?\s*\[\s*"""
        r"""["']([A-Za-z0-9_.+-]+)["']"""
    )
    execs = re.compile(r"""os\.exec\w*\(\s*["']([A-Za-z0-9_.+-]+)["']""")
    found: set[str] = set()
    for path in (ROOT / "csi_driver").rglob("*.py"):
        if "proto" in path.parts:
            continue
        text = path.read_text()
        found.update(pattern.findall(text))
        found.update(execs.findall(text))
    return found - NOT_HOST_TOOLS


def test_base_is_debian_slim_python(dockerfile):
    stages, _ = dockerfile
    assert len(stages) >= 2, "expected a multi-stage build (builder + runtime)"
    aliases = {s.alias for s in stages if s.alias}
    for s in stages:
        if s.base in aliases:
            continue
        slim = r"(docker\.io/(library/)?)?python:3\.1[1-9](\.\d+)?-slim-(bookworm|trixie)"
        assert re.fullmatch(slim, s.base), f"stage base {s.base!r} is not a Debian slim Python image"
    assert stages[-1].base == stages[0].base, "builder and runtime must share the Python (ABI of the wheels)"


def test_builder_builds_wheels_and_runtime_installs_them_offline(dockerfile):
    stages, _ = dockerfile
    builder, runtime = stages[0], stages[-1]
    assert builder.alias, "the builder stage needs a name for COPY --from / --mount from="
    wheel = re.compile(r"""\bpip wheel\b.*--wheel-dir[ =]/wheels\b.*\s["']?\.(\[[\w,-]+\])?["']?$""")
    assert any(wheel.search(c) for c in builder.run_commands()), \
        "the builder must run `pip wheel --wheel-dir /wheels .` (extras allowed)"
    installs = [c for c in runtime.run_commands() if "pip install" in c]
    assert installs, "the runtime stage must pip install the wheels"
    project = "overlay-csi"
    if PYPROJECT.is_file():
        project = tomllib.loads(PYPROJECT.read_text())["project"]["name"]
    for c in installs:
        assert "--no-index" in c and "/wheels" in c, f"runtime install must use only the built wheels: {c}"
        names = [re.sub(r"\[.*\]$", "", w) for w in shlex.split(c)]
        assert project in names, f"runtime must install the {project} distribution: {c}"
        assert f"from={builder.alias}" in c or any(
            op == "COPY" and f"--from={builder.alias}" in a for op, a in runtime.instructions
        ), "the wheels must come from the builder stage"


def test_builder_copies_what_the_build_needs(dockerfile):
    stages, _ = dockerfile
    sources: list[str] = []
    for op, args in stages[0].instructions:
        if op == "COPY" and "--from" not in args:
            words = [w for w in args.split() if not w.startswith("--")]
            sources.extend(words[:-1])

    def copied(rel: str) -> bool:
        return any(Path(rel).match(src.rstrip("/")) or rel.startswith(src.rstrip("/") + "/")
                   or rel == src.rstrip("/") for src in sources)

    for src in sources:
        if not any(ch in src for ch in "*?["):
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    assert copied("pyproject.toml")
    assert copied("csi_driver/__init__.py")
    if PYPROJECT.is_file():
        readme = tomllib.loads(PYPROJECT.read_text())["project"].get("readme")
        if isinstance(readme, str):
            assert copied(readme), f"pyproject's readme {readme} is not copied into the builder"


def test_every_host_tool_comes_from_an_installed_package(dockerfile):
    stages, _ = dockerfile
    installed = apt_packages(stages[-1])
    called = tools_called_by_the_code()
    unknown = sorted(called - DEBIAN_PACKAGE_OF.keys())
    assert not unknown, (
        f"the code runs {unknown}: add them to DEBIAN_PACKAGE_OF "
        "(and install their package in the Dockerfile)"
    )
    missing = {tool: DEBIAN_PACKAGE_OF[tool] for tool in sorted(REQUIRED_TOOLS | called)
               if DEBIAN_PACKAGE_OF[tool] not in installed}
    assert not missing, f"runtime stage installs {sorted(installed)}, missing packages for {missing}"
    assert "--no-install-recommends" in " ".join(stages[-1].run_commands())
    assert any("rm -rf /var/lib/apt/lists" in c for c in stages[-1].run_commands())


def test_package_table_matches_this_machine():
    """Where a tool is installed here, dpkg agrees with DEBIAN_PACKAGE_OF."""
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system: no dpkg-query")
    present = [tool for tool in DEBIAN_PACKAGE_OF if shutil.which(tool)]
    if not present:
        pytest.skip("none of the tools is installed here")
    # One query for all tools: "package: /sbin/losetup" lines.
    proc = subprocess.run(["dpkg-query", "-S", *(f"*bin/{t}" for t in present)],
                          capture_output=True, text=True, timeout=60)
    owners: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        owners.setdefault(Path(path.strip()).name, set()).update(p.strip() for p in pkgs.split(","))
    checked = 0
    for tool in present:
        if tool in owners:
            package = DEBIAN_PACKAGE_OF[tool]
            assert package in owners[tool], f"{tool} belongs to {owners[tool]}, not {package}"
            checked += 1
    if not checked:
        pytest.skip("none of the tools is installed from a package here")


def test_entrypoint_is_the_console_script(dockerfile):
    stages, _ = dockerfile
    entrypoints = [args for op, args in stages[-1].instructions if op == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "the runtime stage needs exactly one ENTRYPOINT"
    entry = json.loads(entrypoints[0])
    assert isinstance(entry, list), "use the exec form: ENTRYPOINT [\"overlay-csi\"]"
    scripts = console_scripts()
    assert "overlay-csi" in scripts, f"pyproject declares no overlay-csi console script: {scripts}"
    assert scripts["overlay-csi"] == "csi_driver.cli:main"
    assert entry == ["overlay-csi"]


def test_chart_runs_the_same_entrypoint():
    """The chart passes `serve ...` as args, relying on the image's ENTRYPOINT."""
    text = (ROOT / "charts" / "overlay-csi" / "templates" / "node-daemonset.yaml").read_text()
    assert "command:" not in text
    assert re.search(r"args:\n\s+- serve\n", text)
