"""Dynamic batching that starts a batch when its first request arrives, for LitServe's batched loop.

LitServe's own collation waits the whole `batch_timeout` from the moment the loop asks, even for a lone
request, and with `batch_timeout=0` polls its queue without blocking, so the worker and the queue's manager
spin a CPU core each while the server is idle. Here a batch blocks for its first request, then takes what
else is queued (a CPU worker busy with the previous batch lets a batch's worth pile up), and waits at most
`batch_timeout` after that first request for more, up to `max_batch_size`. Requests are handled as
LitServe's loop handles them: a START message when workers may restart, and a 504 for one that waited in
the queue past the server's `timeout`.
"""

from __future__ import annotations

import time
from queue import Empty, Queue
from typing import Any

from litserve import LitAPI
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_POLL_S = 1.0  # how long one blocking wait for a first request lasts before the loop looks again


class FirstArrivalBatchedLoop(BatchedLoop):
    def get_batch_requests(self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport) -> tuple[list, list]:
        """(payloads, timed-out (queue id, uid) pairs) of one batch; both empty when nothing came."""
        payloads: list = []
        timed_out: list = []
        deadline = None
        while len(payloads) + len(timed_out) < lit_api.max_batch_size:
            if deadline is None:
                wait: float | None = IDLE_POLL_S
            else:
                wait = deadline - time.monotonic()
            try:
                request = request_queue.get(timeout=wait) if wait and wait > 0 else request_queue.get_nowait()
            except Empty:
                break
            if request == _SENTINEL_VALUE:
                raise _StopLoopError()
            deadline = deadline or time.monotonic() + lit_api.batch_timeout
            self._take(lit_api, transport, request, payloads, timed_out)
        return payloads, timed_out

    def _take(self, lit_api: LitAPI, transport: MessageTransport, request: Any, payloads: list,
              timed_out: list) -> None:
        queue_id, uid, timestamp, body = request
        self.put_response(transport=transport, response_queue_id=queue_id, uid=uid, response_data=(),
                          status=LitAPIStatus.START, response_type=LoopResponseType.REGULAR)
        limit = lit_api.request_timeout
        if limit not in (-1, False, None) and time.monotonic() - timestamp > limit:
            timed_out.append((queue_id, uid))
        else:
            payloads.append((queue_id, uid, body))
