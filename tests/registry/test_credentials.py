"""Registry credentials from a request's secrets: each login bound to the registry host it
was given for, a login for no host refused, a docker config read as untrusted input."""

from __future__ import annotations

import base64
import json

import pytest

from csi_driver.errors import FailedPrecondition
from csi_driver.registry.credentials import MAX_DOCKER_CONFIG, Credentials, Login

PASSWORD = "pa55-n0t-in-any-message"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def refused(secrets: dict[str, str], *words: str) -> str:
    """The FAILED_PRECONDITION message ``secrets`` get; it never repeats a secret value."""
    with pytest.raises(FailedPrecondition) as e:
        Credentials.from_secrets(secrets)
    message = str(e.value)
    for word in words:
        assert word in message, message
    for secret in (PASSWORD, b64(f"u:{PASSWORD}"), b64(PASSWORD)):
        assert secret not in message, message
    return message


def test_no_login_is_anonymous() -> None:
    assert Credentials.from_secrets({}) is None
    assert Credentials.from_secrets({"registry": "reg.io"}) is None, "a host alone gives no login"


def test_a_login_without_a_registry_is_refused() -> None:
    """No host: refused, never "any registry" (a snapshot id or baseLayer may name any)."""
    message = refused(
        {"username": "u", "password": PASSWORD},
        "add a 'registry' key (HOST[:PORT]",
        "never sent to a host they were not given for",
    )
    assert message.startswith("registry secrets:"), message
    refused({"password": PASSWORD, "registry": "reg.io"}, "need both 'username' and 'password'")
    refused({"username": "u"}, "need both")


def test_a_login_is_for_its_host_only() -> None:
    """``registry`` (or docker config's ``server``) binds the login to one host."""
    for secrets in (
        {"registry": "Reg.IO:5000"},
        {"server": "https://reg.io:5000/v1/"},
        {"registry": "reg.io:5000", "server": "reg.io:5000"},
    ):
        creds = Credentials.from_secrets({"username": "u", "password": PASSWORD, **secrets})
        assert creds is not None and creds.hosts == ["reg.io:5000"]
        assert creds.for_host("reg.io:5000") == Login("u", PASSWORD) == creds.for_host("REG.io:5000")
        assert creds.for_host("reg.io") is None and creds.for_host("evil.io:5000") is None
        assert PASSWORD not in repr(creds)
    for bad in ({"registry": "bad host"}, {"server": "https://"}, {"registry": "a.io", "server": "b.io"}):
        refused({"username": "u", "password": PASSWORD, **bad}, "registry secrets")


def test_a_docker_config_gives_one_login_per_host() -> None:
    """``kubernetes.io/dockerconfigjson`` as the sidecars pass it (key ``.dockerconfigjson``):
    keys by host or URL, ``auth`` (base64 USER:PASSWORD) read as docker reads it (it wins
    over ``username``/``password``); the legacy ``.dockercfg`` has no ``auths`` level."""
    auths = {
        "https://Reg.io:5000/v1/": {"username": "a", "password": PASSWORD, "auth": b64(f"a:{PASSWORD}")},
        "other.io": {"auth": b64("b:p:with:colons"), "email": "x@y"},
        "third.io": {"username": "ignored", "password": "ignored", "auth": b64("c:pc")},
        "reg.io:5000": {"username": "a", "password": PASSWORD},  # the same login again: fine
    }
    creds = Credentials.from_secrets({".dockerconfigjson": json.dumps({"auths": auths, "credsStore": "x"})})
    assert creds is not None and creds.hosts == ["other.io", "reg.io:5000", "third.io"]
    assert creds.for_host("reg.io:5000") == Login("a", PASSWORD)
    assert creds.for_host("other.io") == Login("b", "p:with:colons")
    assert creds.for_host("third.io") == Login("c", "pc")
    assert creds.for_host("reg.io") is None and creds.for_host("evil.io") is None
    assert PASSWORD not in repr(creds)
    legacy = Credentials.from_secrets({".dockercfg": json.dumps({"old.io": {"auth": b64("d:pd")}})})
    assert legacy is not None and legacy.for_host("old.io") == Login("d", "pd") and legacy.hosts == ["old.io"]


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"auths": {"reg.io": {"auth": "%%%" + PASSWORD}}}, ("the entry for reg.io", "not base64")),
        ({"auths": {"reg.io": {"auth": b64(PASSWORD)}}}, ("the entry for reg.io", "USER:PASSWORD")),
        ({"auths": {"reg.io": {"username": "u"}}}, ("the entry for reg.io has neither",)),
        ({"auths": {"reg.io": {"password": PASSWORD, "identitytoken": "t"}}}, ("the entry for reg.io",)),
        ({"auths": {"reg.io": {"username": "u", "password": 5}}}, ("the entry for reg.io",)),
        ({"auths": {"reg.io": {"auth": 7}}}, ("the entry for reg.io", "not a string")),
        ({"auths": {"reg.io": PASSWORD}}, ("the entry for reg.io is not an object",)),
        ({"auths": {"bad host!": {"auth": b64(f"u:{PASSWORD}")}}}, ("'bad host!' is not a registry host",)),
        ({"auths": {}}, ("names no registry",)),
        ({"auths": [PASSWORD]}, ("names no registry",)),
        ({"registry": "reg.io"}, ("names no registry",)),
        ([PASSWORD], ("is not a docker config",)),
        (
            {"auths": {"https://reg.io/v1/": {"auth": b64("u:one")}, "reg.io": {"auth": b64("u:two")}}},
            ("two different entries for reg.io",),
        ),
    ],
)
def test_a_malformed_docker_config_is_refused_without_repeating_a_secret(
    config: object, words: tuple[str, ...]
) -> None:
    message = refused({".dockerconfigjson": json.dumps(config)}, *words)
    assert message.startswith("registry secrets: '.dockerconfigjson'"), message


def test_a_docker_config_is_read_bounded_and_alone() -> None:
    refused({".dockerconfigjson": '{"auths": {"reg.io": {"auth": "' + PASSWORD}, "is not a docker config")
    refused({".dockerconfigjson": "[" * 100_000}, "exceeds 64 KiB")
    nested = "[" * 30_000 + "]" * 30_000  # under the cap, deeper than the parser's recursion
    assert len(nested) < MAX_DOCKER_CONFIG
    refused({".dockerconfigjson": nested}, "is not a docker config")
    big = json.dumps({"auths": {"reg.io": {"auth": b64(f"u:{PASSWORD}")}}, "pad": "x" * MAX_DOCKER_CONFIG})
    refused({".dockerconfigjson": big}, "exceeds 64 KiB")
    config = json.dumps({"auths": {"reg.io": {"auth": b64(f"u:{PASSWORD}")}}})
    for extra in ({"username": "u", "password": PASSWORD}, {"registry": "reg.io"}, {".dockercfg": "{}"}):
        refused({".dockerconfigjson": config, **extra}, "not several")
