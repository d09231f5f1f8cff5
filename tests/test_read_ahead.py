import threading

import pytest
import torch

from hf_gpt.read_ahead import ReadAhead
from test_data import long_documents, packed, saved_and_loaded, take


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("depth", [0, 1, 5])
def test_batches_read_ahead_are_the_streams_in_its_order(depth):
    docs = long_documents()
    reader = ReadAhead(packed(docs, 64), depth)
    try:
        assert same(take(reader, 40), take(packed(docs, 64), 40))
    finally:
        reader.close()


@pytest.mark.parametrize("before, after", [(4, 4), (4, 0), (0, 3)])
def test_a_checkpoint_taken_while_reading_ahead_resumes_exactly(before, after):
    """The state holds the batches read but not yet served: a resumed run serves exactly what an uninterrupted one
    would, whatever either reads ahead."""
    docs = long_documents()
    straight = take(packed(docs, 64), 50)
    first = ReadAhead(packed(docs, 64), before)
    take(first, 17)
    if before:  # the reader is ahead: the stream has moved past what was served
        with first._ready:
            first._ready.wait_for(lambda: len(first.pending) == before)
    state = saved_and_loaded(first.state_dict())
    first.close()
    assert len(state["pending"]) == before
    second = ReadAhead(packed(docs, 64), after)
    second.load_state_dict(state)
    try:
        assert same(take(second, 33), straight[17:])
    finally:
        second.close()


def test_a_checkpoint_from_before_read_ahead_resumes_from_the_streams_state():
    docs = long_documents()
    straight, old = take(packed(docs, 64), 30), packed(docs, 64)
    take(old, 12)
    reader = ReadAhead(packed(docs, 64), 3)
    reader.load_state_dict(saved_and_loaded(old.state_dict()))  # the stream's state alone
    try:
        assert same(take(reader, 18), straight[12:])
    finally:
        reader.close()


class Failing:
    """Batches 0, 1, 2, ... and an error in place of batch `bad`."""

    def __init__(self, bad: int):
        self.n, self.bad = 0, bad

    def __next__(self):
        self.n += 1
        if self.n - 1 == self.bad:
            raise ValueError("record 5 is malformed")
        return {"input_ids": torch.tensor([self.n - 1])}


def test_an_error_while_reading_is_raised_where_its_batch_would_be_served():
    reader = ReadAhead(Failing(bad=5), depth=3)
    served = [int(next(reader)["input_ids"]) for _ in range(5)]
    with pytest.raises(ValueError, match="record 5 is malformed"):
        next(reader)
    assert served == [0, 1, 2, 3, 4]


def test_the_end_of_the_stream_ends_the_batches():
    class Three(Failing):
        def __next__(self):
            if self.n == 3:
                raise StopIteration
            return super().__next__()

    reader = ReadAhead(Three(bad=-1), depth=2)
    assert [int(b["input_ids"]) for b in reader] == [0, 1, 2]


def test_close_stops_the_reader():
    reader = ReadAhead(packed(long_documents(), 64), depth=2)
    next(reader)
    reader.close()
    assert not reader._thread.is_alive()
    assert not any(t.name == "read-ahead" and t.is_alive() for t in threading.enumerate())
