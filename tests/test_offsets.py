from hypothesis import given
from hypothesis import strategies as st

from streamtasks.broker.base import TopicPartition
from streamtasks.worker.offsets import OffsetTracker, PartitionOffsets

TP = TopicPartition("t", 0)


def test_out_of_order_completion_waits_for_the_lowest():
    part = PartitionOffsets()
    for off in (10, 11, 12):
        part.add(off)
    part.mark_done(12)
    part.mark_done(11)
    assert part.watermark() is None  # 10 is still running
    part.mark_done(10)
    assert part.watermark() == 13


def test_failed_commit_keeps_the_watermark_due():
    tracker = OffsetTracker()
    tracker.add(TP, 0)
    tracker.mark_done(TP, 0)
    assert tracker.watermarks() == {TP: 1}
    # the commit failed: nothing was recorded, so the same mark is offered again
    assert tracker.watermarks() == {TP: 1}
    tracker.committed({TP: 1})
    assert tracker.watermarks() == {}


def test_dropped_partition_ignores_late_completions():
    tracker = OffsetTracker()
    tracker.add(TP, 5)
    tracker.drop([TP])
    tracker.mark_done(TP, 5)
    assert tracker.watermarks() == {}
    assert tracker.in_flight() == 0


@given(
    st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=60),
    st.randoms(use_true_random=False),
)
def test_watermark_never_passes_an_unfinished_offset(gaps, rnd):
    # Given offsets with gaps, taken in order and finished in a random order
    offsets, off = [], 0
    for gap in gaps:
        off += gap
        offsets.append(off)
    tracker = OffsetTracker()
    for o in offsets:
        tracker.add(TP, o)
    order = offsets[:]
    rnd.shuffle(order)
    finished: set[int] = set()
    committed = None
    for o in order:
        # When one more finishes
        tracker.mark_done(TP, o)
        finished.add(o)
        marks = tracker.watermarks()
        if TP in marks:
            committed = marks[TP]
            tracker.committed(marks)
        # Then every offset below the committed mark is finished, and the mark is
        # exactly one past the longest finished prefix
        prefix = 0
        while prefix < len(offsets) and offsets[prefix] in finished:
            prefix += 1
        expected = offsets[prefix - 1] + 1 if prefix else None
        assert committed == expected
    assert committed == offsets[-1] + 1
    assert tracker.in_flight() == 0
