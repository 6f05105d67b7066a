"""forward_batch.build: slots, positions, query tiles and sampled rows from a SchedulerOutput."""

from __future__ import annotations

from tierlm.attention.torch_ref import QUERY_TILE
from tierlm.runner.forward_batch import build
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput


def sched(rid, tokens, start, table, sample):
    return ScheduledRequest(rid, tokens, start, table, sample, SamplingParams(), 0, tokens, [])


def test_flatten_two_requests():
    out = SchedulerOutput([sched("a", [5, 6, 7, 8, 9], 0, [3, 4], False), sched("b", [42], 17, [1, 2], True)])
    b = build(out, block_size=16)
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 42]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 17]
    assert b.attn.slot_mapping.tolist() == [48, 49, 50, 51, 52, 2 * 16 + 1]
    assert b.logits_indices.tolist() == [5] and b.sample_request_ids == ["b"]
    rows = b.attn.tile_rows.tolist()
    assert len(rows) == 2 + 1 and all(len(r) == QUERY_TILE for r in rows)
    # every token maps back to its own row through the tiles
    flat = [r for tile in rows for r in tile]
    assert [flat[i] for i in b.attn.token_tile_index.tolist()] == list(range(6))
    assert b.attn.tile_blocks[-1, :2].tolist() == [1, 2] and b.attn.num_key_tiles == 1
