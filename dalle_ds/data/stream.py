"""Training micro-batches read from a stream (data.streaming): data larger than memory, no pass up front.

`fit` (training/loop.py) asks its order for each micro-batch in turn. DataOrder (order.py) answers with
indices into a map-style dataset; StreamOrder answers with the items themselves, read on the fly from this
rank's shard by `stream_items` (record n goes to rank n % world; decoded, converted, filtered and counted).

The order is sequential, so the state is small: epoch, raw position in the shard, items handed out, the pass
counts and a running digest of the keys read. `fit` checkpoints it per rank (extra_state), and a resumed run
reads exactly the items an uninterrupted run would have read next. At the end of its shard a rank starts the
next epoch over it (other random crops and flips). There is no shuffle buffer: items come in source order
(shuffle webdataset shards when writing them).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading

from dalle_ds.config import ConfigError, DataConfig
from dalle_ds.data.report import PassReport
from dalle_ds.data.sources import stream_items

log = logging.getLogger(__name__)


def chain_digest(digest: str, key: str) -> str:
    """Running fingerprint of the keys read so far, in order (equal digests = the same items read)."""
    return hashlib.blake2b(f"{digest}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class StreamOrder:
    """Sequential per-rank micro-batches of {"key", "image", "caption"} with a checkpointable position.

    `prefetch` > 0 decodes up to that many items ahead in a background thread (PIL and torch release the
    GIL), overlapping loading with the training step. Each queued item carries the state as of that item,
    so the state handed to a checkpoint never includes what was read ahead.
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str = "train",
        purpose: str = "dvae",
        *,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 0,
    ):
        self.cfg, self.split, self.purpose, self.rank, self.world = cfg, split, purpose, rank, world
        self.prefetch = prefetch
        self.epoch, self.position, self.items, self.keys_digest = 0, 0, 0, ""
        self.report = PassReport()
        self._source = None  # iterator of (epoch, position, report dict, item), opened at the next read
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def state_dict(self) -> dict:
        return {
            "rank": self.rank,
            "world": self.world,
            "epoch": self.epoch,
            "position": self.position,
            "items": self.items,
            "keys_digest": self.keys_digest,
            "report": self.report.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(
                f"stream checkpoint of rank {state['rank']}/{state['world']} cannot resume rank "
                f"{self.rank}/{self.world}: the shards differ; resume with the same number of ranks"
            )
        self.close()  # reopen at the restored position on the next read
        self.epoch, self.position, self.items = state["epoch"], state["position"], state["items"]
        self.keys_digest, self.report = state["keys_digest"], PassReport.from_dict(state["report"])

    def close(self) -> None:
        """Stop reading ahead and wait for the reader (the next read reopens the stream at the current position).

        The join matters at exit: a reader thread still decoding while the interpreter shuts down aborts the
        process ("terminate called without an active exception")."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            if self._thread.is_alive():
                log.warning("rank %d: the stream reader did not stop within 60 s", self.rank)
        self._source, self._stop, self._thread = None, None, None

    def _entries(self, epoch: int, position: int, report: PassReport):
        """(epoch, position, report dict, item) from the given state on, over epochs without end."""
        while True:
            empty = position == 0  # a whole pass without an item: nothing usable at all
            for position, item in stream_items(
                self.cfg,
                self.split,
                self.purpose,
                rank=self.rank,
                world=self.world,
                start=position,
                report=report,
                epoch=epoch,
            ):
                empty = False
                yield epoch, position, report.as_dict(), item
            if empty:
                raise ConfigError(
                    f"data.path: rank {self.rank} of {self.world} has no usable {self.split} records "
                    f"in {self.cfg.path} ({report.summary()})"
                )
            log.info("rank %d finished epoch %d of its %s stream: %s", self.rank, epoch, self.split, report.summary())
            epoch, position = epoch + 1, 0

    def _open(self):
        entries = self._entries(self.epoch, self.position, PassReport.from_dict(self.report.as_dict()))
        if self.prefetch <= 0:
            return entries
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = self._stop = threading.Event()

        def put(entry) -> bool:
            """Queue `entry` unless asked to stop first (never blocks past a stop)."""
            while not stop.is_set():
                try:
                    q.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def fill():
            try:
                for entry in entries:
                    if not put(entry):
                        return
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                put(e)
            finally:
                entries.close()  # release the source here, not in the interpreter's shutdown

        self._thread = threading.Thread(target=fill, name=f"stream-rank{self.rank}", daemon=True)
        self._thread.start()

        def drain():
            while True:
                entry = q.get()
                if isinstance(entry, BaseException):
                    raise entry
                yield entry

        return drain()

    def _next_item(self) -> dict:
        if self._source is None:
            self._source = self._open()
        self.epoch, self.position, report, item = next(self._source)
        self.report = PassReport.from_dict(report)
        return item

    def micro_batch(
        self, step: int, *, global_batch: int, micro: int, accum_index: int, rank: int, world: int
    ) -> list[dict]:
        """The next `micro` items of this rank's stream: the micro-batch `accum_index` of step `step`."""
        expected = (step * (global_batch // (micro * world)) + accum_index) * micro
        if expected != self.items or (rank, world) != (self.rank, self.world):
            raise RuntimeError(
                f"stream order asked for step {step} micro-batch {accum_index} (item {expected}) "
                f"but has handed out {self.items} items: a stream is read in order only"
            )
        batch = [self._next_item() for _ in range(micro)]
        for item in batch:
            self.keys_digest = chain_digest(self.keys_digest, item["key"])
        self.items += micro
        return batch


def first_items(
    cfg: DataConfig, split: str, limit: int, purpose: str = "dvae", report: PassReport | None = None
) -> list[dict]:
    """The first `limit` usable items of a split (all of them if fewer), e.g. a fixed validation sample."""
    out = []
    for _, item in stream_items(cfg, split, purpose, report=report):
        out.append(item)
        if len(out) == limit:
            break
    return out
