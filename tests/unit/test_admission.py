"""Past-Future admission as pure functions: the history's predictions and the peak."""

from tierlm.scheduler.admission import OutputLengthHistory, peak_blocks


def blocks4(n: int) -> int:
    return -(-n // 4)


def test_peak_is_taken_just_before_each_finish():
    # a: 8 tokens, 4 more -> 12 tokens (3 blocks) at t=4; b: 4 tokens, 12 more -> 16 (4 blocks) at t=12.
    # t=4: a 12 (3) + b 8 (2) = 5; t=12: b alone 16 (4); now: 2 + 1 = 3.
    assert peak_blocks([(8, 4), (4, 12)], blocks4) == 5
    assert peak_blocks([], blocks4) == 0
    assert peak_blocks([(9, 0)], blocks4) == 3  # nothing more to generate: its current blocks


def test_history_predicts_from_finished_lengths_beyond_what_was_generated():
    h = OutputLengthHistory(window=100, quantile=0.9, min_samples=8)
    assert h.remaining(0, 50) == 50  # no history: the cap (greedy-safe)
    for n in [10] * 9 + [40]:
        h.record(n)
    assert h.remaining(0, 100) == 40  # the 0.9 quantile of 10 samples is the largest here
    assert h.remaining(5, 100) == 35
    assert h.remaining(20, 100) == 20  # only the 40 is longer than 20 tokens
    assert h.remaining(45, 100) == 100  # longer than anything seen: back to the cap
    assert h.remaining(0, 7) == 7 and h.remaining(3, 0) == 0


def test_history_window_forgets_old_lengths():
    h = OutputLengthHistory(window=8, quantile=0.5, min_samples=8)
    for _ in range(8):
        h.record(100)
    for _ in range(8):
        h.record(4)
    assert h.remaining(0, 1000) == 4
