"""The registry pool on its own: a transfer outlives its caller's deadline and the
retry attaches to it; only its own deadline and the driver stopping cancel it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from csi_driver.errors import Aborted, Unavailable
from csi_driver.registry import cancel
from csi_driver.service.registry_pool import RegistryPool


class Caller:
    """What the pool asks of a gRPC context: the time left, and a callback when the call ends."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.callbacks: list[Callable[[], None]] = []

    def time_remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def add_callback(self, fn: Callable[[], None]) -> bool:
        self.callbacks.append(fn)
        return True

    def go_away(self) -> None:
        for fn in self.callbacks:
            fn()


class Transfer:
    """An idempotent fn: the first call moves data until ``release`` (or its cancellation),
    later calls find what it made."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.release = threading.Event()
        self.fail = fail
        self.moved = 0  # transfers that ran to their end
        self.tokens: list[cancel.Cancel] = []

    def __call__(self) -> str:
        if self.moved:
            return "volume"
        token = cancel.current()
        assert token is not None
        self.tokens.append(token)
        for _ in range(400):  # at most 20 s
            if self.release.is_set():
                break
            token.wait(0.05)
        if self.fail is not None:
            raise self.fail
        self.moved += 1
        return "volume"


@pytest.fixture
def pool() -> Iterator[RegistryPool]:
    p = RegistryPool(size=2, transfer_timeout=30)
    yield p
    p.close(wait=5)


def aborted(call: Callable[[], object]) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(Aborted) as e:
        call()
    return str(e.value), time.monotonic() - start


def test_the_transfer_goes_on_and_the_retry_gets_its_result(pool: RegistryPool) -> None:
    fn = Transfer()
    message, took = aborted(lambda: pool.run(fn, Caller(0.5), "the pull for volume 'v'", keys=["name:v"]))
    assert "the pull for volume 'v' is still running in the background" in message and took < 1.5
    assert pool.running() == 1 and pool.busy("name:v") and not fn.tokens[0].cancelled
    message, took = aborted(lambda: pool.run(fn, Caller(0.5), "the pull for volume 'v'", keys=["name:v"]))
    assert "still running in the background" in message and took < 1.5, "the retry attached, and answered"
    threading.Timer(0.3, fn.release.set).start()
    assert pool.run(fn, Caller(5), "the pull for volume 'v'", keys=["name:v"]) == "volume"
    assert fn.moved == 1 and len(fn.tokens) == 1, "one transfer; the retry found what it made"
    assert pool.running() == 0 and not pool.busy("name:v")


def test_a_caller_that_goes_away_does_not_cancel_the_transfer(pool: RegistryPool) -> None:
    fn = Transfer()
    caller = Caller(60)
    threading.Timer(0.2, caller.go_away).start()
    _message, took = aborted(lambda: pool.run(fn, caller, "the push of snapshot 's'", keys=["snapname:s"]))
    assert took < 1.5 and pool.running() == 1 and not fn.tokens[0].cancelled
    fn.release.set()
    assert pool.run(fn, Caller(5), "the push of snapshot 's'", keys=["snapname:s"]) == "volume"
    assert fn.moved == 1


def test_the_transfer_timeout_cancels_it_and_the_next_call_starts_afresh() -> None:
    pool = RegistryPool(size=2, transfer_timeout=0.3)
    try:
        fn = Transfer()
        message, took = aborted(lambda: pool.run(fn, Caller(10), "the pull for volume 'v'", keys=["name:v"]))
        assert "was cancelled (it ran for 0.3 s, its --registry-transfer-timeout)" in message, message
        assert took < 2 and pool.running() == 0 and fn.tokens[0].cancelled
        fn.release.set()
        assert pool.run(fn, Caller(10), "the pull for volume 'v'", keys=["name:v"]) == "volume"
        assert len(fn.tokens) == 2 and fn.moved == 1
    finally:
        pool.close(wait=5)


def test_a_failed_background_transfer_answers_the_attached_retry_once(pool: RegistryPool) -> None:
    fn = Transfer(fail=Unavailable("registry r: cannot pull: the registry answered 503"))
    aborted(lambda: pool.run(fn, Caller(0.3), "the pull for volume 'v'", keys=["name:v"]))
    threading.Timer(0.3, fn.release.set).start()
    with pytest.raises(Unavailable, match="answered 503"):
        pool.run(fn, Caller(5), "the pull for volume 'v'", keys=["name:v"])
    assert len(fn.tokens) == 1, "the retry heard the transfer's error; it did not start another"
    fn.fail = None
    assert pool.run(fn, Caller(5), "the pull for volume 'v'", keys=["name:v"]) == "volume"
    assert len(fn.tokens) == 2, "the next call started afresh"


def test_background_transfers_count_against_the_pool(pool: RegistryPool) -> None:
    fns = [Transfer() for _ in range(2)]
    for n, fn in enumerate(fns):
        aborted(lambda fn=fn, n=n: pool.run(fn, Caller(0.2), f"pull {n}", keys=[f"name:{n}"]))
    message, took = aborted(lambda: pool.run(Transfer(), Caller(5), "pull 2", keys=["name:2"]))
    assert "2 registry transfers are already running" in message and took < 0.5
    for fn in fns:
        fn.release.set()


def test_close_cancels_background_transfers() -> None:
    pool = RegistryPool(size=2, transfer_timeout=60)
    fn = Transfer()
    aborted(lambda: pool.run(fn, Caller(0.2), "the pull for volume 'v'", keys=["name:v"]))
    start = time.monotonic()
    pool.close(wait=5)
    assert time.monotonic() - start < 2 and pool.running() == 0
    assert fn.tokens[0].reason == "the driver is stopping"
    with pytest.raises(Unavailable):
        pool.run(fn, Caller(5), "the pull for volume 'v'", keys=["name:v"])


@pytest.mark.parametrize(
    ("text", "seconds"), [(None, 3600.0), ("1h30m", 5400.0), ("45s", 45.0), ("90", 90.0)]
)
def test_the_serve_flag_takes_a_duration(text: str | None, seconds: float) -> None:
    from csi_driver.cli import build_parser

    argv = ["serve"] + (["--registry-transfer-timeout", text] if text else [])
    assert build_parser().parse_args(argv).registry_transfer_timeout == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5m", "1d", "h", "inf", "nan"])
def test_the_serve_flag_refuses_no_timeout(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from csi_driver.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", f"--registry-transfer-timeout={text}"])
    err = capsys.readouterr().err
    assert "--registry-transfer-timeout" in err and "duration" in err, err


def test_a_transfer_without_keys_ends_with_its_caller(pool: RegistryPool) -> None:
    """Nothing could attach to it (a lookup): going on would only hold a slot."""
    fn = Transfer()
    message, took = aborted(lambda: pool.run(fn, Caller(0.3), "the lookup of snapshot x"))
    assert "the lookup of snapshot x was cancelled (its caller stopped waiting)" in message and took < 1.5
    assert fn.tokens[0].cancelled
    for _ in range(100):
        if pool.running() == 0:
            break
        time.sleep(0.05)
    assert pool.running() == 0
