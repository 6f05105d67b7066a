"""The replica router's rule (session, longest prefix unless overloaded, least loaded), its
table of held blocks, and the transfer cost model; pure, no Ray."""

from __future__ import annotations

import pytest

from tierlm.engine.async_engine import EngineStats
from tierlm.scale.router import PrefixRouter
from tierlm.scale.transfer import TransferModel
from tierlm.server.run import ServeOptions, StartupError


def chain(tag: str, n: int) -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def test_longest_prefix_wins_while_not_overloaded():
    r = PrefixRouter(3, capacity_blocks=100, overload_tokens=100)
    r.routed(1, chain("a", 4), tokens=50)
    r.routed(2, chain("a", 2), tokens=0)
    d = r.choose(chain("a", 6))
    assert (d.replica, d.reason, d.matched, d.holder) == (1, "prefix", 4, None)
    r.routed(1, [], tokens=60)  # 110 outstanding vs 0: over the margin
    d = r.choose(chain("a", 6))
    assert (d.replica, d.reason, d.matched, d.holder, d.holder_matched) == (0, "balance", 0, 1, 4)
    r.progressed(1, 20)  # 90 outstanding: within it again
    assert r.choose(chain("a", 6)).replica == 1


def test_a_miss_goes_to_the_least_loaded_in_turn():
    r = PrefixRouter(2, capacity_blocks=10)
    picks = [r.choose(chain("x", 3)).replica for _ in range(4)]
    assert picks == [0, 1, 0, 1]  # equal load: round robin among the least loaded
    r.routed(0, [], tokens=5)
    assert {r.choose(chain("y", 3)).replica for _ in range(3)} == {1}


def test_sessions_stick_and_follow_a_lost_replica_away():
    r = PrefixRouter(2, capacity_blocks=10)
    r.routed(1, chain("a", 2), tokens=1, session_id="s")
    r.routed(0, chain("b", 8), tokens=0)
    d = r.choose(chain("b", 8), session_id="s")
    assert (d.replica, d.reason, d.holder, d.holder_matched) == (1, "session", 0, 8)
    r.lost(1)
    assert r.live() == [0] and r.session_replica("s") is None
    assert r.choose(chain("a", 2), session_id="s").replica == 0
    r.joined(1)
    assert r.matched(1, chain("a", 2)) == 0  # a replacement starts empty


def test_the_table_forgets_the_oldest_blocks_beyond_capacity():
    r = PrefixRouter(1, capacity_blocks=4)
    r.record(0, chain("a", 3))
    r.record(0, chain("b", 3))
    assert r.matched(0, chain("b", 3)) == 3 and r.matched(0, chain("a", 3)) == 0  # a0, a1 gone first


def test_round_robin_ignores_prefixes_and_excluded_replicas_are_skipped():
    r = PrefixRouter(3, capacity_blocks=10, routing="round_robin")
    r.routed(2, chain("a", 4), tokens=0)
    assert [r.choose(chain("a", 4)).replica for _ in range(3)] == [0, 1, 2]
    p = PrefixRouter(2, capacity_blocks=10)
    p.routed(0, chain("a", 4), tokens=0)
    assert p.choose(chain("a", 4), exclude=frozenset({0})).replica == 1
    with pytest.raises(ValueError, match="no live replica"):
        p.choose([], exclude=frozenset({0, 1}))
    with pytest.raises(ValueError, match="routing must be"):
        PrefixRouter(2, 10, routing="random")


def test_transfer_pays_when_the_prefill_takes_longer():
    m = TransferModel.from_probe(small_s=0.005, big_s=0.021, big_bytes=16_000_000)  # 1 GB/s + 5 ms
    assert m.bytes_per_s == pytest.approx(1e9)
    assert m.worth_it(nbytes=4_000_000, tokens=256, prefill_s_per_token=0.003)  # 9 ms vs 768 ms
    assert not m.worth_it(nbytes=4_000_000, tokens=2, prefill_s_per_token=0.003)  # 9 ms vs 6 ms
    m.observe(100_000_000, 0.505)  # slower than probed: the estimate moves toward 200 MB/s
    assert 1e9 > m.bytes_per_s > 7e8
    with pytest.raises(ValueError):
        TransferModel(0.0, 0.0)


def test_replica_totals_stay_monotonic_when_a_replica_is_replaced():
    from tierlm.scale.stats import add_totals, combined

    a = EngineStats(running=2, prefix_hits=100, kv_usage=0.5, kv_tiers={"hits": {"warm": 3}, "usage": {"hot": 10}})
    b = EngineStats(running=1, prefix_hits=40, kv_usage=0.1, kv_tiers={"hits": {"warm": 1}, "usage": {"hot": 4}})
    both = combined([a, b], EngineStats())
    assert (both.running, both.prefix_hits, both.kv_usage) == (3, 140, pytest.approx(0.3))
    assert both.kv_tiers == {"hits": {"warm": 4}, "moved": {}, "usage": {"hot": 14}}
    retired = EngineStats()
    add_totals(retired, b)  # b died; its replacement starts from zero
    after = combined([a, EngineStats()], retired)
    assert (after.running, after.prefix_hits, after.kv_tiers["hits"]) == (2, 140, {"warm": 4})


@pytest.mark.parametrize(("field", "value", "flag"), [("data_parallel_size", 0, "--data-parallel-size"),
                                                      ("replica_threads", 0, "--replica-threads"),
                                                      ("dp_overload_tokens", -1, "--dp-overload-tokens")])
def test_replica_options_are_checked(field, value, flag):
    with pytest.raises(StartupError, match=flag):
        ServeOptions(**{field: value})


def test_lora_and_tensor_parallel_tiers_are_refused_before_ray_starts():
    from tierlm.config import EngineConfig, LoRAConfig, TierConfig, TierSetConfig
    from tierlm.server.run import _start_ray

    def tierset(engine: EngineConfig) -> TierSetConfig:
        return TierSetConfig((TierConfig("t", engine),), (), "t")

    opts = ServeOptions(data_parallel_size=2)
    with pytest.raises(StartupError, match="LoRA adapters are not served over replicas"):
        _start_ray(tierset(EngineConfig(lora=LoRAConfig(enabled=True))), opts)
    with pytest.raises(StartupError, match="replicas of a tensor-parallel model"):
        _start_ray(tierset(EngineConfig(dtype="float32", tensor_parallel_size=2)), opts)
