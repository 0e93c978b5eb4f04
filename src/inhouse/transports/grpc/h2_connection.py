"""h2's connection for the gRPC front and its inner link (``front.py``, ``forward.py``), with the
open-stream count that h2 takes for every new stream made amortised constant time.

h2 counts the open streams by walking all the streams it holds, and forgets the closed ones on
the way, each time a stream opens (to hold ``SETTINGS_MAX_CONCURRENT_STREAMS``). With 64 calls
in flight on a connection that is about a tenth of what h2 spends receiving a call, and it grows
with the streams in flight (1,024 allowed here). While the connection holds fewer streams than
the limit, their number is an upper bound on the open ones that cannot refuse a stream, so the
walk is skipped until the streams held have doubled since the last one: the decision is the one
h2's exact count gives, and closed streams are still forgotten, in batches."""

from __future__ import annotations

from collections.abc import Callable

import h2.connection

# Streams held before the first walk: a connection with a few calls never needs one.
_FIRST_WALK = 32


class Connection(h2.connection.H2Connection):
    """``h2.connection.H2Connection`` whose ``open_inbound_streams`` and ``open_outbound_streams``
    answer the number of streams held (open or closed but not yet forgotten) while that is below
    the peer's or our limit and below twice what the last exact count left."""

    _walk_at = _FIRST_WALK

    @property
    def open_inbound_streams(self) -> int:
        return self._counted(lambda: super(Connection, self).open_inbound_streams,
                             self.local_settings.max_concurrent_streams)

    @property
    def open_outbound_streams(self) -> int:
        return self._counted(lambda: super(Connection, self).open_outbound_streams,
                             self.remote_settings.max_concurrent_streams)

    def _counted(self, exact: Callable[[], int], limit: int) -> int:
        held = len(self.streams)
        if held < self._walk_at and held < limit:
            return held  # at least the open ones, and one more stays within the limit
        count = exact()  # h2's walk: counts, and forgets the closed streams
        self._walk_at = 2 * len(self.streams) + _FIRST_WALK
        return count


__all__ = ["Connection"]
