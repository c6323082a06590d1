"""The serving batch loop: a batch starts at its first request, takes what is queued, waits at most
`batch_timeout` after that request for more, never spins on an empty queue, and stops on LitServe's sentinel."""

from __future__ import annotations

import threading
import time
from queue import Queue
from types import SimpleNamespace

import pytest

from tunelab.deploy import batching


def api(max_batch_size: int = 16, batch_timeout: float = 0.0, request_timeout: float = 30.0) -> SimpleNamespace:
    return SimpleNamespace(max_batch_size=max_batch_size, batch_timeout=batch_timeout, request_timeout=request_timeout)


def request(uid: int, age_s: float = 0.0) -> tuple:
    return (0, f"uid-{uid}", time.monotonic() - age_s, {"text": str(uid)})


def batch(lit_api: SimpleNamespace, queue: Queue) -> tuple[list, list]:
    return batching.FirstArrivalBatchedLoop().get_batch_requests(lit_api, queue, transport=None)


def queued(*items: tuple) -> Queue:
    queue: Queue = Queue()
    for item in items:
        queue.put(item)
    return queue


def test_a_batch_takes_what_is_queued_without_waiting_up_to_the_maximum() -> None:
    start = time.monotonic()
    payloads, timed_out = batch(api(max_batch_size=16), queued(*(request(i) for i in range(3))))
    assert [p[1] for p in payloads] == ["uid-0", "uid-1", "uid-2"] and timed_out == []
    assert time.monotonic() - start < 0.5
    queue = queued(*(request(i) for i in range(20)))
    assert len(batch(api(max_batch_size=16), queue)[0]) == 16 and queue.qsize() == 4


def test_the_wait_for_more_starts_at_the_first_request_and_ends_at_batch_timeout() -> None:
    queue: Queue = Queue()
    threading.Timer(0.2, queue.put, (request(0),)).start()  # arrives while the loop blocks
    threading.Timer(0.3, queue.put, (request(1),)).start()  # within 0.5 s of the first: same batch
    threading.Timer(1.2, queue.put, (request(2),)).start()  # after the batch closed: the next one
    start = time.monotonic()
    payloads, _ = batch(api(batch_timeout=0.5), queue)
    took = time.monotonic() - start
    assert [p[1] for p in payloads] == ["uid-0", "uid-1"]
    assert 0.6 <= took < 1.1, took  # first arrival (0.2 s) + batch_timeout (0.5 s), not 0.5 s from the call


def test_an_idle_queue_blocks_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "IDLE_POLL_S", 0.3)
    start, cpu = time.monotonic(), time.process_time()
    assert batch(api(), Queue()) == ([], [])
    assert time.monotonic() - start >= 0.29
    assert time.process_time() - cpu < 0.1  # blocked on the queue, not polling it


def test_requests_that_waited_past_the_timeout_are_set_aside_and_the_sentinel_stops_the_loop() -> None:
    from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError

    payloads, timed_out = batch(api(request_timeout=1.0), queued(request(0, age_s=5.0), request(1)))
    assert [p[1] for p in payloads] == ["uid-1"] and timed_out == [(0, "uid-0")]
    with pytest.raises(_StopLoopError):
        batch(api(), queued(request(0), _SENTINEL_VALUE))
