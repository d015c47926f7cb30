"""The memory back end: records in this process only, gone with it (``--store memory``).

Records are held encoded (the same bytes the other back ends write), so that ``max_bytes``
counts what they really cost and a test of the seam exercises the encoding.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from .base import Store, StoreOptions
from .record import CompletionRecord, decode, encode

logger = logging.getLogger(__name__)


class MemoryStore(Store):
    name = "memory"

    def __init__(self, options: StoreOptions | None = None, instance_id: str | None = None) -> None:
        super().__init__(options, instance_id)
        self._records: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        """id -> (expires_at, encoded record), least recently written first."""
        self._bytes = 0
        self._next_purge = time.monotonic() + self.options.purge_interval_s

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._records)

    def _put(self, record: CompletionRecord) -> None:
        data = encode(record)
        if len(data) > self.options.max_bytes:
            self.stats.dropped += 1
            self._warn.warning(
                logger,
                "completion %s (%d bytes) is larger than the store's cap (%d bytes): not stored",
                record.id,
                len(data),
                self.options.max_bytes,
            )
            return
        self._forget(record.id)
        self._records[record.id] = (record.expires_at, data)
        self._bytes += len(data)
        self.stats.records_written += 1
        while self._bytes > self.options.max_bytes:
            self._forget(next(iter(self._records)))
            self.stats.evicted += 1
        if time.monotonic() >= self._next_purge:
            self.purge()

    def purge(self) -> int:
        """Delete expired records; how many."""
        self._next_purge = time.monotonic() + self.options.purge_interval_s
        now = time.time()
        gone = [cid for cid, (expires_at, _) in self._records.items() if expires_at <= now]
        for cid in gone:
            self._forget(cid)
        self.stats.expired += len(gone)
        return len(gone)

    def _forget(self, completion_id: str) -> bool:
        entry = self._records.pop(completion_id, None)
        if entry is None:
            return False
        self._bytes -= len(entry[1])
        return True

    async def _get(self, completion_id: str) -> CompletionRecord | None:
        entry = self._records.get(completion_id)
        return None if entry is None else decode(entry[1])

    async def _delete(self, completion_id: str) -> bool:
        return self._forget(completion_id)

    def _discard(self, completion_id: str) -> None:
        self._forget(completion_id)
