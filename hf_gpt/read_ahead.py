"""Training batches read ahead of the training loop, in a thread of their own, and checkpointed exactly."""

from __future__ import annotations

import threading
from collections import deque


class ReadAhead:
    """Serves a checkpointable batch iterator's batches (state_dict()/load_state_dict()), read `depth` micro-batches
    ahead in a background thread (0: in the caller's thread, when asked).

    Why a thread: a streamed corpus is tokenized as the batches are read, in lumps (`datasets` maps 256 documents
    at a time: on a corpus of books ~1.2M tokens, ~0.5 s of CPU), and read in the loop's thread each lump stalls
    the GPU (docs/results/time-to-quality.md). The tokenizer's own work releases the GIL, so a thread overlaps it
    with the steps the GPU runs.

    The first batch is read at once (set_up takes the batch shape from it, and it is then served as the first
    step's, not read again). A checkpoint holds the stream's state and the batches already read but not yet
    served, so that a resumed run serves exactly the batches an uninterrupted one would, whatever the depth
    before or after. An error raised while reading (a malformed record) is raised where its batch would have
    been served, after the batches read before it.
    """

    def __init__(self, batches, depth: int = 0):
        self.batches, self.depth = batches, depth
        self.pending = deque([next(batches)])
        self._ready = threading.Condition()  # guards pending and the reader's end
        self._reading = threading.Lock()  # held while the stream moves on: its state and pending stay in step
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ended = self._closed = False

    @property
    def first(self) -> dict:
        """The first batch to be served (its shape sets the run's)."""
        return self.pending[0]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.depth:
            return self.pending.popleft() if self.pending else next(self.batches)
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="read-ahead", daemon=True)
            self._thread.start()
        with self._ready:
            self._ready.wait_for(lambda: self.pending or self._ended)
            if self.pending:
                batch = self.pending.popleft()
                self._ready.notify_all()
                return batch
        if self._error is not None:
            raise self._error
        raise StopIteration

    def _read(self) -> None:
        try:
            while True:
                with self._ready:
                    self._ready.wait_for(lambda: len(self.pending) < self.depth or self._closed)
                    if self._closed:
                        return
                with self._reading:
                    batch = next(self.batches)
                    with self._ready:
                        self.pending.append(batch)
                        self._ready.notify_all()
        except StopIteration:
            pass
        except BaseException as e:  # raised in the loop's thread, where this batch would have been served
            self._error = e
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify_all()

    def state_dict(self) -> dict:
        with self._reading, self._ready:  # not while the reader is between the stream and pending
            return {"stream": self.batches.state_dict(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        """Before the first batch is served. A checkpoint from before read-ahead holds the stream's state alone."""
        if self._thread is not None:
            raise RuntimeError("a read-ahead's state is loaded before it serves its first batch")
        if "pending" in state:
            self.batches.load_state_dict(state["stream"])
            self.pending = deque(state["pending"])
        else:
            self.batches.load_state_dict(state)
            self.pending = deque()

    def close(self) -> None:
        """Stops the reader (it finishes the batch it is reading)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join()
