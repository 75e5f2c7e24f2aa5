"""What a registry (or whoever names one) may obtain from a node: credentials only
for the registry they were given for (and credentials given for none are refused),
never over plain HTTP to a host that is not an --insecure-registry, and a layer
the node holds only by proving access to it.

The attackers are small HTTP(S) servers of the test's own on 127.0.0.1 that record
every request's headers; the honest side is Debian's real docker-registry."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2 as csi
from csi_driver.registry.client import OCI_MANIFEST, RegistryClient
from csi_driver.registry.reference import Repository
from driver_harness import Driver, serving, staged
from registry_harness import REGISTRY_BINARY, FaultProxy, LocalRegistry

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not REGISTRY_BINARY.exists(), reason="needs Debian's docker-registry package"),
]

MiB = 1 << 20
SECRET_PASSWORD = "n0t-f0r-y0u"
SNAP = "snap-" + "5" * 32

# (status, headers, body) for a request: (method, path, headers)
Answer = tuple[int, dict[str, str], bytes]
Handler = Callable[[str, str, dict[str, str]], Answer]


class Hostile:
    """A threaded HTTP(S) server on 127.0.0.1 that answers with ``handler`` and
    records (method, path, headers) of every request it receives."""

    def __init__(self, handler: Handler, tls: tuple[Path, Path] | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.host = ""
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> Hostile:
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                headers = dict(self.headers.items())
                outer.requests.append((self.command, self.path, headers))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, extra, body = outer.handler(self.command, self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self.host = f"127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def authorizations(self) -> list[str]:
        return [h["Authorization"] for _m, _p, h in self.requests if "Authorization" in h]


def self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 and its key (``cryptography``, else the openssl CLI)."""
    cert, key = where / "cert.pem", where / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("needs the cryptography package or the openssl CLI for a TLS server")
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def token_registry(realm: str) -> Handler:
    """A registry that wants a bearer token from ``realm``; with one, it has nothing (404)."""

    def handle(method: str, path: str, headers: dict[str, str]) -> Answer:
        if headers.get("Authorization", "").startswith("Bearer "):
            return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
        challenge = f'Bearer realm="{realm}",service="evil",scope="repository:x/db:pull"'
        return 401, {"WWW-Authenticate": challenge, "Content-Type": "application/json"}, b"{}"

    return handle


def token_service(method: str, path: str, headers: dict[str, str]) -> Answer:
    return 200, {"Content-Type": "application/json"}, b'{"token": "t", "access_token": "t"}'


def basic_registry(method: str, path: str, headers: dict[str, str]) -> Answer:
    """A registry that asks for a username and password (and so would read them)."""
    return 401, {"WWW-Authenticate": 'Basic realm="evil"', "Content-Type": "application/json"}, b"{}"


def code_of(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


def committed(d: Driver) -> list[str]:
    return sorted(x.id for x in d.engine.layers() if not x.active)


def test_a_token_service_on_plain_http_never_sees_the_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTPS registry whose challenge names an http:// realm: refused before anything
    is sent there. A realm over HTTPS on another host is used, as docker clients do."""
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # the driver trusts our TLS registry
    secrets = {"username": "victim", "password": SECRET_PASSWORD}
    (tmp_path / "node").mkdir()
    with ExitStack() as stack:
        plain = stack.enter_context(Hostile(token_service))
        tls = stack.enter_context(Hostile(token_registry(f"http://{plain.host}/token"), tls=(cert, key)))
        d = stack.enter_context(serving(tmp_path / "node"))
        answers = [
            code_of(
                d.client.create_volume,
                "r",
                64 * MiB,
                snapshot=snapshot,
                parameters=params,
                secrets={**secrets, "registry": tls.host},
            )
            for params, snapshot in (
                ({}, f"{tls.host}/x/db:{SNAP}"),
                ({"baseLayer": f"{tls.host}/x/db:1"}, ""),
            )
        ]
        assert any(p == "/v2/" for _m, p, _h in tls.requests), "the HTTPS registry was asked (over TLS)"
        assert plain.authorizations() == [], "no Authorization header reached the plain-HTTP realm"
        assert plain.requests == [], "nothing at all went to it"
        for code, message in answers:
            assert code == grpc.StatusCode.FAILED_PRECONDITION, message
            assert f"token service http://{plain.host} is plain HTTP" in message, message

        # the same over HTTPS to a token service on another host:port is what docker does
        realm = stack.enter_context(Hostile(token_service, tls=(cert, key)))
        other = stack.enter_context(Hostile(token_registry(f"https://{realm.host}/token"), tls=(cert, key)))
        code, message = code_of(
            d.client.create_volume,
            "r",
            64 * MiB,
            snapshot=f"{other.host}/x/db:{SNAP}",
            secrets={**secrets, "registry": other.host},
        )
        assert code == grpc.StatusCode.NOT_FOUND, message
        assert len(realm.authorizations()) == 1 and realm.authorizations()[0].startswith("Basic ")
        assert d.engine.layers() == []


def test_credentials_go_only_to_the_registry_they_are_for(tmp_path: Path) -> None:
    """A secret with ``registry: HOST`` logs in there and nowhere else: a snapshot id or
    a baseLayer naming another host is asked anonymously, and the error says why."""
    with ExitStack() as stack:
        reg = stack.enter_context(
            LocalRegistry(tmp_path / "registry", username="ci", password=SECRET_PASSWORD)
        )
        evil = stack.enter_context(Hostile(basic_registry))
        (tmp_path / "node").mkdir()
        d = stack.enter_context(
            serving(tmp_path / "node", insecure_registries=frozenset({reg.host, evil.host}))
        )
        bound = {"username": "ci", "password": SECRET_PASSWORD, "registry": reg.host}

        vid = d.client.create_volume("v", 64 * MiB).volume_id
        with staged(d, vid) as root:
            (root / "f").write_text("tenant data\n")
        snap = d.client.create_snapshot(
            "s", vid, parameters={"repository": f"{reg.host}/a/db"}, secrets=bound
        )
        assert snap.ready_to_use, "the registry they are bound to gets them"

        answers = [
            code_of(
                d.client.create_volume, "r", 64 * MiB, snapshot=snapshot, parameters=params, secrets=bound
            )
            for params, snapshot in (
                ({}, f"{evil.host}/x/db:{SNAP}"),
                ({"baseLayer": f"{evil.host}/x/img:1"}, ""),
            )
        ]
        assert evil.requests, "the other registry was asked (anonymously)"
        assert evil.authorizations() == [], "and never given the credentials"
        for code, message in answers:
            assert code == grpc.StatusCode.UNAUTHENTICATED, message
            assert f"the request's credentials are for registry {reg.host} only" in message, message

        # docker config's key names the registry as well, with or without a scheme
        for key, value in (("server", f"https://{reg.host}/v1/"), ("registry", f"http://{reg.host}")):
            secrets = {"username": "ci", "password": SECRET_PASSWORD, key: value}
            code, message = code_of(
                d.client.create_volume, "r", 64 * MiB, snapshot=f"{evil.host}/x/db:{SNAP}", secrets=secrets
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED, message
        assert evil.authorizations() == []
        code, message = code_of(
            d.client.create_volume,
            "r",
            64 * MiB,
            snapshot=snap.snapshot_id,
            secrets={**bound, "registry": "bad host!"},
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "must name a registry host" in message, message
        d.client.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id, secrets=bound)
        )
        d.client.delete_volume(vid)


def test_credentials_for_no_registry_are_refused_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``username``/``password`` without ``registry`` could go to whatever host a snapshot id,
    a ``baseLayer`` or a repository names: every call that would reach a registry with them
    is refused (FAILED_PRECONDITION) before anything is sent or changed, on a node and on the
    central instance, whether that host is reached over HTTPS or plain HTTP."""
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    unbound = {"username": "victim", "password": SECRET_PASSWORD}
    with ExitStack() as stack:
        plain = stack.enter_context(Hostile(basic_registry))
        tls = stack.enter_context(Hostile(basic_registry, tls=(cert, key)))
        insecure = frozenset({plain.host})
        for name in ("node", "central"):
            (tmp_path / name).mkdir()
        d = stack.enter_context(serving(tmp_path / "node", insecure_registries=insecure))
        central = stack.enter_context(
            serving(
                tmp_path / "central",
                node_id="central",
                mode="controller-expand",
                kubernetes="off",
                insecure_registries=insecure,
            )
        )
        vid = d.client.create_volume("v", 64 * MiB).volume_id
        with staged(d, vid) as root:
            (root / "f").write_text("tenant data\n")
        layers = committed(d)

        for evil in (plain, tls):
            sid = f"{evil.host}/x/db:{SNAP}"
            export = {"repository": f"{evil.host}/x/db"}
            image = {"baseLayer": f"{evil.host}/x/i:1"}
            delete = csi.DeleteSnapshotRequest(snapshot_id=sid, secrets=unbound)
            answers = [
                code_of(d.client.create_snapshot, "s", vid, parameters=export, secrets=unbound),
                code_of(d.client.create_volume, "r", 64 * MiB, snapshot=sid, secrets=unbound),
                code_of(d.client.create_volume, "r", 64 * MiB, parameters=image, secrets=unbound),
                code_of(d.client.controller.DeleteSnapshot, delete),
                code_of(central.client.controller.DeleteSnapshot, delete),
                code_of(
                    central.client.controller.ListSnapshots,  # the registry snapshotter's lookup
                    csi.ListSnapshotsRequest(snapshot_id=sid, secrets=unbound),
                ),
            ]
            for code, message in answers:
                assert code == grpc.StatusCode.FAILED_PRECONDITION, message
                assert "name no registry: add a 'registry' key (HOST[:PORT]" in message, message
                assert "never sent to a host they were not given for" in message, message
                assert SECRET_PASSWORD not in message
            assert evil.authorizations() == [], "no Authorization header reached the host the call named"
            assert evil.requests == [], "nothing at all was sent there"

        assert d.engine.list_snapshots(0, 10) == [], "no snapshot was taken"
        assert committed(d) == layers, "no layer was committed or pulled"
        assert [x.id for x in d.engine.list_volumes(0, 10)] == [vid]
        d.client.delete_volume(vid)


def docker_config(auths: dict[str, dict[str, str]]) -> dict[str, str]:
    """A ``kubernetes.io/dockerconfigjson`` Secret's data as the sidecars pass it."""
    return {".dockerconfigjson": json.dumps({"auths": auths})}


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_docker_config_secret_logs_in_to_the_hosts_it_names_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``.dockerconfigjson`` Secret exports, restores and deletes against a registry that
    wants a login (kubectl's form, and ``auth`` alone); a snapshot id or ``baseLayer``
    naming another host is asked anonymously and told which hosts the credentials are for;
    a malformed entry is refused before anything is sent; at debug level no part of the
    config reaches the log."""
    caplog.set_level(logging.DEBUG)
    with ExitStack() as stack:
        reg = stack.enter_context(
            LocalRegistry(tmp_path / "registry", username="ci", password=SECRET_PASSWORD)
        )
        evil = stack.enter_context(Hostile(basic_registry))
        insecure = frozenset({reg.host, evil.host})
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        a = stack.enter_context(serving(tmp_path / "a", insecure_registries=insecure))
        b = stack.enter_context(serving(tmp_path / "b", insecure_registries=insecure))
        auth = basic("ci", SECRET_PASSWORD)
        kubectl = docker_config(
            {f"http://{reg.host}": {"username": "ci", "password": SECRET_PASSWORD, "auth": auth}}
        )
        auth_only = docker_config({reg.host: {"auth": auth}, "elsewhere.example": {"auth": basic("x", "y")}})

        vid = a.client.create_volume("v", 64 * MiB).volume_id
        with staged(a, vid) as root:
            (root / "f").write_text("tenant data\n")
        params = {"repository": f"{reg.host}/a/db"}
        code, message = code_of(a.client.create_snapshot, "anon", vid, parameters=params)
        assert code == grpc.StatusCode.UNAUTHENTICATED, "the registry wants a login: " + message
        snap = a.client.create_snapshot("s", vid, parameters=params, secrets=kubectl)
        assert snap.ready_to_use, "the host its auths entry names gets the login"
        restored = b.client.create_volume("r", 64 * MiB, snapshot=snap.snapshot_id, secrets=auth_only)
        with staged(b, restored.volume_id) as root:
            assert (root / "f").read_text() == "tenant data\n"
        b.client.delete_volume(restored.volume_id)

        for secrets, hosts in ((kubectl, f"registry {reg.host}"), (auth_only, "registries")):
            for params, snapshot in (
                ({}, f"{evil.host}/x/db:{SNAP}"),
                ({"baseLayer": f"{evil.host}/x/i:1"}, ""),
            ):
                code, message = code_of(
                    b.client.create_volume,
                    "r",
                    64 * MiB,
                    snapshot=snapshot,
                    parameters=params,
                    secrets=secrets,
                )
                assert code == grpc.StatusCode.UNAUTHENTICATED, message
                assert f"the request's credentials are for {hosts}" in message, message
        assert f"registries {reg.host}, elsewhere.example only" in message, message
        assert evil.requests, "the other host was asked (anonymously)"
        assert evil.authorizations() == [], "and never given the credentials"

        asked = len(evil.requests)
        broken = docker_config({evil.host: {"auth": "not base64!"}})
        code, message = code_of(
            b.client.create_volume, "r", 64 * MiB, snapshot=f"{evil.host}/x/db:{SNAP}", secrets=broken
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION, message
        assert f"the entry for {evil.host}: its 'auth' is not base64" in message, message
        assert len(evil.requests) == asked, "refused before anything was sent"

        a.client.controller.DeleteSnapshot(
            csi.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id, secrets=kubectl)
        )
        code, message = code_of(
            b.client.create_volume, "r", 64 * MiB, snapshot=snap.snapshot_id, secrets=auth_only
        )
        assert code == grpc.StatusCode.NOT_FOUND, "the artifact went with the snapshot: " + message
        a.client.delete_volume(vid)
        assert a.engine.layers() == [] and b.engine.layers() == []
    logged = caplog.text + "".join(str(rec.__dict__) for rec in caplog.records)
    assert "DEBUG" in caplog.text and "***stripped***" in logged, "requests were logged, redacted"
    for secret in (SECRET_PASSWORD, auth, kubectl[".dockerconfigjson"], auth_only[".dockerconfigjson"]):
        assert secret not in logged, "no part of the docker config reached the log"


def test_a_layer_is_not_given_for_knowing_its_digest(tmp_path: Path) -> None:
    """Node B holds tenant A's layer (restored from A's repository). A manifest on another
    registry that names its digest gets it only if that registry serves the blob: a
    hostile one that cannot (but says it has it) gets NOT_FOUND; an honest copy is
    downloaded once, checked, and the layer B holds is used (nothing is built twice)."""
    with ExitStack() as stack:
        reg = stack.enter_context(LocalRegistry(tmp_path / "registry"))
        reg2 = stack.enter_context(LocalRegistry(tmp_path / "registry2"))
        proxy = stack.enter_context(FaultProxy(reg2.url))
        served: dict[str, bytes] = {}

        def hostile(method: str, path: str, headers: dict[str, str]) -> Answer:
            if path == "/v2/":
                return 200, {}, b"{}"
            if "/manifests/" in path and "manifest" in served:
                return 200, {"Content-Type": OCI_MANIFEST}, served["manifest"]
            if "/blobs/" in path and method == "HEAD":
                return 200, {}, b""  # it claims to have every blob
            return 404, {"Content-Type": "application/json"}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'

        evil = stack.enter_context(Hostile(hostile))
        insecure = frozenset({reg.host, proxy.host, evil.host})
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        a = stack.enter_context(serving(tmp_path / "a", insecure_registries=insecure))
        b = stack.enter_context(serving(tmp_path / "b", insecure_registries=insecure))

        vid = a.client.create_volume("v", 64 * MiB).volume_id
        with staged(a, vid) as root:
            (root / "secret").write_text("tenant A only\n")
        snap = a.client.create_snapshot("s", vid, parameters={"repository": f"{reg.host}/tenant-a/db"})
        mine = b.client.create_volume("mine", 64 * MiB, snapshot=snap.snapshot_id)
        held = committed(b)
        assert len(held) == 1

        # the attacker's registry serves A's manifest (only digests) under its own name
        source = RegistryClient(Repository(reg.host, "tenant-a/db"), insecure=True)
        manifest = source.pull_manifest(snap.snapshot_id.rsplit(":", 1)[1])
        served["manifest"] = json.dumps(manifest.body).encode()
        layer = manifest.body["layers"][0]
        code, message = code_of(
            b.client.create_volume, "stolen", 64 * MiB, snapshot=f"{evil.host}/tenant-b/x:{SNAP}"
        )
        assert code == grpc.StatusCode.NOT_FOUND and "download blob" in message, message
        assert ("GET", f"/v2/tenant-b/x/blobs/{layer['digest']}") in [(m, p) for m, p, _h in evil.requests]
        assert committed(b) == held and [v.name for v in b.engine.list_volumes(0, 10)] == ["mine"]

        # an honest copy in another registry: B downloads it to prove access, then uses its layer
        copy = RegistryClient(Repository(reg2.host, "tenant-b/copy"), insecure=True)
        for blob in (manifest.body["config"], layer):
            source.pull_blob(blob["digest"], blob["size"], tmp_path / "blob")
            copy.push_blob(tmp_path / "blob", blob["digest"], blob["size"])
        copy.push_manifest(manifest.body, SNAP)
        copied = f"{proxy.host}/tenant-b/copy:{SNAP}"
        gets = lambda: [
            r for r in proxy.requests if r[:2] == ("GET", f"/v2/tenant-b/copy/blobs/{layer['digest']}")
        ]  # noqa: E731
        first = b.client.create_volume("copy", 64 * MiB, snapshot=copied)
        assert len(gets()) == 1 and gets()[0][2] == 200, "the registry served the blob to this caller"
        assert committed(b) == held, "and the layer B holds was used, not built again"
        with staged(b, first.volume_id) as root:
            assert (root / "secret").read_text() == "tenant A only\n"
        second = b.client.create_volume("copy2", 64 * MiB, snapshot=copied)
        assert len(gets()) == 1, "pulled from that repository once: the manifest is enough after"
        for volume in (mine, first, second):
            b.client.delete_volume(volume.volume_id)
        assert b.engine.layers() == []
