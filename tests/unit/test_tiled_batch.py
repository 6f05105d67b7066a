"""tiled_batch.build (the PyTorch backend's layout): slots, positions, query tiles and sampled
rows from a SchedulerOutput."""

from __future__ import annotations

from tierlm.attention.tiled_batch import build
from tierlm.attention.torch_ref import PROMPT_TILE
from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput


def sched(rid, tokens, start, tables, sample):
    """`tables`: one block table, or a list of them (one per KV group)."""
    tables = tables if tables and isinstance(tables[0], list) else [tables]
    return ScheduledRequest(rid, tokens, start, tables, sample, len(tokens))


def test_flatten_two_requests():
    out = SchedulerOutput([sched("a", [5, 6, 7, 8, 9], 0, [3, 4], False), sched("b", [42], 17, [1, 2], True)])
    b = build(out, block_size=16, decode_layout=(4, False))
    (attn,) = b.attn
    assert b.input_ids.tolist() == [5, 6, 7, 8, 9, 42]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 17]
    assert attn.slot_mapping.tolist() == [48, 49, 50, 51, 52, 2 * 16 + 1]
    assert b.logits_indices.tolist() == [5] and b.sample_request_ids == ["b"]
    # "a" is all prompt (one tall tile), "b" a generated token (one short tile), in that order.
    prompt, generated = attn.tiles
    assert prompt.rows.shape == (1, PROMPT_TILE) and generated.rows.shape == (1, 4)
    assert prompt.rows[0, :5].tolist() == [0, 1, 2, 3, 4] and generated.rows[0].tolist() == [5] * 4
    # every token maps back to its own row through the tiles
    flat = [r for t in attn.tiles for tile in t.rows.tolist() for r in tile]
    assert [flat[i] for i in attn.token_tile_index.tolist()] == list(range(6))
    # "b" at position 17 sees key tile 0 only: one item, its blocks from b's table
    assert generated.item_blocks.tolist() == [[1, 2] + [0] * 6] and generated.combine.tolist() == [[0]]
    # "a" (positions 0..4) sees key tile 0, and keys past each query are masked
    assert prompt.item_blocks[0, :2].tolist() == [3, 4]
    assert prompt.key_bias[0, 0, 2, :4].tolist() == [0, 0, 0, float("-inf")]  # row 2 = position 2


def test_prompt_rows_come_first_whatever_the_schedule_order():
    """A decode scheduled before a prompt chunk still takes a row after every prompt row."""
    decode = ScheduledRequest("d", [11], 20, [[1, 2]], True, 20)
    out = SchedulerOutput([decode, sched("p", [5, 6, 7], 0, [3], True)])
    b = build(out, block_size=16)
    assert b.prompt_rows == 3
    assert b.input_ids.tolist() == [5, 6, 7, 11] and b.positions.tolist() == [0, 1, 2, 20]
    assert b.logits_indices.tolist() == [3, 2] and b.sample_request_ids == ["d", "p"]


def test_groups_get_their_own_slots_and_a_window_skips_dead_tiles():
    """Two KV groups (full, window 130): own slot mappings; key tiles behind a window skipped."""
    full = list(range(1, 22))  # 21 blocks of 16 -> positions up to 335
    sliding = [0] * 8 + list(range(30, 43))  # blocks 0..7 released (positions < 128)
    out = SchedulerOutput([sched("a", [7, 8], 300, [full, sliding], True)])
    b = build(out, block_size=16, windows=(None, 130), decode_layout=(1, False))
    f, w = b.attn
    assert f.window is None and w.window == 130
    assert f.slot_mapping.tolist() == [full[300 // 16] * 16 + 300 % 16, full[301 // 16] * 16 + 301 % 16]
    assert w.slot_mapping.tolist() == [sliding[300 // 16] * 16 + 300 % 16, sliding[301 // 16] * 16 + 301 % 16]
    (ft,), (wt,) = f.tiles, w.tiles
    # two generated tokens, one tile each; context 302 -> key tiles 0..2, merged in order
    assert ft.combine.tolist() == [[0, 1, 2], [3, 4, 5]]
    # positions 300/301 see keys > 170/171: key tile 0 (0..127) is dead, tile 1 is not
    assert wt.combine.tolist() == [[0, 1], [2, 3]]
    assert wt.item_blocks.tolist() == [sliding[8:16], sliding[16:21] + [0] * 3] * 2


def test_whole_context_decode_items():
    """One item per decode over the longest context in the step, rounded to a key tile;
    each item masks the keys past its own position."""
    a = ScheduledRequest("a", [5], 130, [list(range(1, 10))], True, 130)
    b = ScheduledRequest("b", [6], 20, [[20, 21]], True, 20)
    (attn,) = build(SchedulerOutput([a, b]), block_size=16, decode_layout=(1, True)).attn
    (tiles,) = attn.tiles
    assert tiles.combine is None and tiles.unseen is None
    assert tiles.item_blocks.tolist() == [list(range(1, 10)) + [0] * 7, [20, 21] + [0] * 14]
    visible = (tiles.key_bias[:, 0, 0] == 0).sum(dim=1).tolist()
    assert visible == [131, 21]  # keys 0..130 and 0..20
