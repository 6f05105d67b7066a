"""Beam search's selection rule and stopping, as pure functions."""

from __future__ import annotations

import math

from tierlm.engine.beam import BeamState, Hypothesis, ranked, score, select

EOS = 0


def test_select_ranks_all_extensions_and_keeps_width_live():
    beams = [(-1.0, [(5, -0.1), (6, -0.5)]), (-0.5, [(7, -0.2), (8, -3.0)])]
    live, ending = select(beams, 2, lambda t: t == EOS)
    assert [(e.source, e.token) for e in live] == [(1, 7), (0, 5)]
    assert ending == [] and math.isclose(live[0].cum_logprob, -0.7)


def test_a_stop_counts_only_among_the_best_width():
    beams = [(0.0, [(EOS, -0.1), (5, -0.2), (6, -0.3), (EOS + 9, -0.4)])]
    live, ending = select(beams, 2, lambda t: t == EOS)
    assert [e.token for e in ending] == [EOS] and [e.token for e in live] == [5, 6]
    live, ending = select([(0.0, [(5, -0.1), (6, -0.2), (EOS, -0.3)])], 2, lambda t: t == EOS)
    assert ending == [] and [e.token for e in live] == [5, 6]


def test_ties_break_by_beam_then_token():
    live, _ = select([(0.0, [(9, -1.0), (3, -1.0)]), (0.0, [(1, -1.0)])], 3, lambda t: False)
    assert [(e.source, e.token) for e in live] == [(0, 3), (0, 9), (1, 1)]


def test_length_penalty_ranks_hypotheses():
    short, long = Hypothesis([1, 2], -2.0, "stop"), Hypothesis([1, 2, 3, 4], -3.0, "stop")
    assert ranked([short, long], 0.0) == [short, long]  # plain cumulative logprob
    assert ranked([short, long], 1.0) == [long, short]  # per-token average
    assert score(-3.0, 4, 1.0) == -0.75


def test_plan_stops_early_when_no_live_beam_can_win():
    st = BeamState(width=1, length_penalty=1.0, live={"a": -1.0})
    live = st.plan([[4]], [[(EOS, -0.1), (5, -0.5)]], {EOS}, {EOS}, at_limit=False)
    assert live == [] and st.finished == [Hypothesis([4, EOS], -1.1, "stop")]


def test_plan_finishes_live_beams_at_the_length_limit():
    st = BeamState(width=2, length_penalty=1.0, live={"a": 0.0})
    live = st.plan([[]], [[(5, -0.1), (6, -0.2), (7, float("-inf"))]], {EOS}, {EOS},
                   at_limit=True)
    assert live == [] and [(h.token_ids, h.finish_reason) for h in st.finished] == [([5], "length"), ([6], "length")]
