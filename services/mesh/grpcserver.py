"""gRPC server options every Mizzen grpc.aio server shares: admit a storm of new calls instead of cancelling them."""

from __future__ import annotations

DEFAULT_MAX_PENDING = 20_000

# Streams may wait this long for the handler to take them during a storm (gRPC's default, 30 s, then cancels them).
ADMIT_WAIT_SECONDS = 600


def admission_options(max_pending: int = DEFAULT_MAX_PENDING) -> list[tuple[str, int]]:
    """Queue new streams instead of cancelling them when they arrive faster than the asyncio server takes them.

    grpc.aio takes one new call at a time from gRPC core, on the event loop; the others wait in core. Past 1,000
    waiting (`grpc.server.max_pending_requests`) core cancels new ones at random, all of them past 3,000 (the hard
    limit), and any that waited 30 s: the client gets a bare RST_STREAM (CANCELLED, or INTERNAL on its next
    write) before any response, and the handler never sees the stream. In a reconnect storm thousands arrive
    within a second while the loop is busy answering the first ones. A waiting stream costs core a few KiB (its
    call and the requests already read), so `max_pending` bounds that memory."""
    return [("grpc.server.max_pending_requests", max_pending),
            ("grpc.server.max_pending_requests_hard_limit", max_pending),
            ("grpc.server_max_unrequested_time_in_server", ADMIT_WAIT_SECONDS)]
