"""Dynamic batching that starts a batch when its first request arrives, for LitServe's batched loop.

LitServe's own collation waits the whole `batch_timeout` from the moment the loop asks, even for a lone
request, and with `batch_timeout=0` polls its queue without blocking, so the worker and the queue's manager
spin a CPU core each while the server is idle. Here a batch blocks for its first request, then takes what
else is queued (a CPU worker busy with the previous batch lets a batch's worth pile up), and waits at most
`batch_timeout` after that first request for more, up to `max_batch_size`. Requests are handled as
LitServe's loop handles them: a START message when workers may restart, a 504 for one that waited in the
queue past the server's `timeout` (it counts towards the batch's size, so one call answers a bounded number),
and the shutdown sentinel ends the loop.
"""

from __future__ import annotations

from queue import Empty, Queue
from time import monotonic
from typing import Any

from litserve import LitAPI
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType

# One blocking wait for a first request is bounded, as LitServe's single loop bounds it: the call holds the
# queue manager's connection, and the loop returns to its caller between waits.
IDLE_POLL_S = 1.0


class FirstArrivalBatchedLoop(BatchedLoop):
    """LitServe's `BatchedLoop` with batches that start at their first request (see the module docstring)."""

    def get_batch_requests(self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport) -> tuple[list, list]:
        """(payloads, timed-out (queue id, uid) pairs) of one batch; both empty when nothing came."""
        payloads: list = []
        timed_out: list = []
        deadline: float | None = None
        while len(payloads) + len(timed_out) < lit_api.max_batch_size:
            wait = IDLE_POLL_S if deadline is None else deadline - monotonic()
            try:
                request = request_queue.get(timeout=wait) if wait > 0 else request_queue.get_nowait()
            except Empty:
                break
            if request == _SENTINEL_VALUE:  # as LitServe's collation: the loop stops, the batch with it
                raise _StopLoopError()
            if deadline is None:
                deadline = monotonic() + lit_api.batch_timeout
            self._accept(lit_api, transport, request, payloads, timed_out)
        return payloads, timed_out

    def _accept(self, lit_api: LitAPI, transport: MessageTransport, request: Any, payloads: list,
                timed_out: list) -> None:
        queue_id, uid, timestamp, body = request
        self.put_response(transport=transport, response_queue_id=queue_id, uid=uid, response_data=(),
                          status=LitAPIStatus.START,
                          response_type=LoopResponseType.STREAMING if lit_api.stream else LoopResponseType.REGULAR)
        limit = lit_api.request_timeout
        if limit not in (-1, False, None) and monotonic() - timestamp > limit:
            timed_out.append((queue_id, uid))
        else:
            payloads.append((queue_id, uid, body))
