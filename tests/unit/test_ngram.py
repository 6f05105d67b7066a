"""N-gram prompt-lookup proposer."""

from __future__ import annotations

from tierlm.spec.ngram import propose


def test_longest_recurring_suffix_drafts_what_followed_it_last():
    assert propose([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert propose([1, 2, 3, 4, 5, 9, 2, 3], 2) == [4, 5]  # "9 2 3" never recurs: "2 3" does
    assert propose([5, 6, 1, 2, 7, 1, 2], 4) == [7, 1, 2]  # the last occurrence wins, up to the end


def test_no_draft_without_recurrence_or_room():
    assert propose([1, 2, 3], 4) == []
    assert propose([1, 2, 1], 0) == []
    assert propose([], 3) == []


def test_matches_whole_tokens_only():
    # 256 and 1 share bytes when packed: only aligned, whole-token matches count.
    assert propose([256, 1, 7, 256], 2) == [1, 7]
    assert propose([1 << 8, 1, 1 << 16, 1 << 8], 1) == [1]
