"""The serving batch loop (`tunelab.deploy.batching`): a batch starts at its first request, takes what is
queued, waits at most `batch_timeout` after that request for more, blocks rather than polls while idle, sets
aside requests that waited too long and stops on LitServe's sentinel. Arrivals run on a scripted clock, so
no assertion depends on how busy the machine is."""

from __future__ import annotations

import time
from queue import Empty, Queue
from types import SimpleNamespace

import pytest
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.utils import LitAPIStatus

from tunelab.deploy import batching


class Clock:
    now = 1000.0


class ScriptedQueue:
    """Requests arriving at set times on a fake clock; records how long each `get` was allowed to wait."""

    def __init__(self, clock: Clock, *arrivals: tuple[float, tuple]) -> None:
        self.clock, self.arrivals, self.waits = clock, sorted(arrivals, key=lambda a: a[0]), []

    def get(self, timeout: float) -> tuple:
        self.waits.append(timeout)
        if self.arrivals and self.arrivals[0][0] <= self.clock.now + timeout:
            at, item = self.arrivals.pop(0)
            self.clock.now = max(self.clock.now, at)
            return item
        self.clock.now += timeout
        raise Empty

    def get_nowait(self) -> tuple:
        return self.get(0.0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(batching, "monotonic", lambda: clock.now)
    return clock


def api(max_batch_size: int = 16, batch_timeout: float = 0.0, request_timeout: float = 30.0) -> SimpleNamespace:
    return SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                           request_timeout=request_timeout, stream=False)


def request(uid: int, sent: float) -> tuple:
    return (0, f"uid-{uid}", sent, {"text": str(uid)})


def arriving(clock: Clock, *delays: float) -> ScriptedQueue:
    return ScriptedQueue(clock, *((clock.now + d, request(i, clock.now + d)) for i, d in enumerate(delays)))


def batch(lit_api: SimpleNamespace, queue: object, loop: batching.FirstArrivalBatchedLoop | None = None,
          transport: object = None) -> tuple[list, list]:
    return (loop or batching.FirstArrivalBatchedLoop()).get_batch_requests(lit_api, queue, transport)


def uids(payloads: list) -> list[str]:
    return [p[1] for p in payloads]


def test_a_batch_takes_what_is_queued_without_waiting_up_to_the_maximum(clock: Clock) -> None:
    queue = arriving(clock, 0, 0, 0)
    payloads, timed_out = batch(api(max_batch_size=16), queue)
    assert uids(payloads) == ["uid-0", "uid-1", "uid-2"] and timed_out == []
    assert queue.waits == [batching.IDLE_POLL_S, 0.0, 0.0, 0.0]  # blocked for the first, then only what was there
    queue = arriving(clock, *[0] * 20)
    assert len(batch(api(max_batch_size=16), queue)[0]) == 16 and len(queue.arrivals) == 4


def test_the_wait_for_more_starts_at_the_first_request_and_ends_at_batch_timeout(clock: Clock) -> None:
    start = clock.now
    queue = arriving(clock, 0.2, 0.3, 1.2)  # the third comes after the batch has closed
    payloads, _ = batch(api(batch_timeout=0.5), queue)
    assert uids(payloads) == ["uid-0", "uid-1"]
    assert clock.now - start == pytest.approx(0.7)  # first arrival (0.2 s) + batch_timeout, not 0.5 s from the call
    assert queue.waits == pytest.approx([batching.IDLE_POLL_S, 0.5, 0.4])
    assert uids(batch(api(batch_timeout=0.5), queue)[0]) == ["uid-2"]


def test_an_idle_queue_blocks_instead_of_polling(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = arriving(clock)
    assert batch(api(), queue) == ([], []) and queue.waits == [batching.IDLE_POLL_S]
    monkeypatch.setattr(batching, "monotonic", time.monotonic)
    monkeypatch.setattr(batching, "IDLE_POLL_S", 0.3)
    start, cpu = time.monotonic(), time.thread_time()
    assert batch(api(), Queue()) == ([], [])  # a real queue: the wait is spent blocked, not on the CPU
    assert time.monotonic() - start >= 0.29 and time.thread_time() - cpu < 0.1


def test_requests_that_waited_too_long_are_set_aside_unless_the_timeout_is_off(clock: Clock) -> None:
    stale = ScriptedQueue(clock, (clock.now, request(0, clock.now - 5.0)), (clock.now, request(1, clock.now)))
    payloads, timed_out = batch(api(request_timeout=1.0), stale)
    assert uids(payloads) == ["uid-1"] and timed_out == [(0, "uid-0")]
    stale = ScriptedQueue(clock, (clock.now, request(0, clock.now - 5.0)))
    assert uids(batch(api(request_timeout=-1), stale)[0]) == ["uid-0"]


def test_the_sentinel_stops_the_loop(clock: Clock) -> None:
    with pytest.raises(_StopLoopError):
        batch(api(), ScriptedQueue(clock, (clock.now, request(0, clock.now)), (clock.now, _SENTINEL_VALUE)))


def test_each_request_is_started_when_workers_may_restart(clock: Clock) -> None:
    sent = []
    transport = SimpleNamespace(send=lambda message, consumer_id: sent.append((consumer_id, message)))
    loop = batching.FirstArrivalBatchedLoop()
    loop._restart_workers = True  # LitServer(restart_workers=True): the server tracks which worker holds what
    batch(api(), arriving(clock, 0, 0), loop, transport)
    assert [(message[0], message[1][1]) for _, message in sent] == [("uid-0", LitAPIStatus.START),
                                                                    ("uid-1", LitAPIStatus.START)]
