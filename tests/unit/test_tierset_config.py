"""The TierSet TOML file: what it builds, and errors that point at the offending line."""

import hashlib

import pytest

from tierlm.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig
from tierlm.tenancy.config_file import load
from tierlm.tenancy.tenants import Tenants

GOOD = """\
default_tier = "fast"

[tiers.fast]
model = "smollm2-135m"
quality = 1
prompt_price_per_mtok = 0.02
completion_price_per_mtok = 0.08

[tiers.deep]
model = "gemma3-270m"
quality = 2
max_num_seqs = 8
kv_cache_gb = 0.25

[tenants.acme]
api_keys = ["sk-acme"]
weight = 2
tokens_per_minute = 5000
cost_ceiling_usd = 1.5

[tenants.hashed]
api_key_sha256 = ["{digest}"]
tiers = ["fast"]

[tenants.public]
anonymous = true
max_concurrent = 2
""".replace("{digest}", hashlib.sha256(b"sk-hashed").hexdigest())

BASE = EngineConfig(cache=CacheConfig(kv_cache_gb=0.5), scheduler=SchedulerConfig(max_num_seqs=16))


def write(tmp_path, text):
    p = tmp_path / "tierlm.toml"
    p.write_text(text)
    return p


def test_builds_tiers_over_the_command_line_defaults_and_tenants(tmp_path):
    ts = load(write(tmp_path, GOOD), BASE)
    assert [t.name for t in ts.tiers] == ["fast", "deep"] and ts.default_tier == "fast"
    fast, deep = ts.tiers
    assert fast.engine.model == "smollm2-135m" and fast.engine.scheduler.max_num_seqs == 16
    assert fast.engine.cache.kv_cache_gb == 0.5
    assert deep.engine.scheduler.max_num_seqs == 8 and deep.engine.cache.kv_cache_gb == 0.25
    assert fast.cost_usd(1_000_000, 500_000) == pytest.approx(0.02 + 0.04)
    acme = next(t for t in ts.tenants if t.name == "acme")
    assert acme.weight == 2 and acme.limits.tokens_per_minute == 5000 and acme.limits.cost_ceiling_usd == 1.5
    assert b"sk-acme" not in repr(ts).encode()  # keys are held as digests only
    tenants = Tenants(ts.tenants)
    assert tenants.authenticate("Bearer sk-acme").name == "acme"
    assert tenants.authenticate("Bearer sk-hashed").name == "hashed"
    assert tenants.authenticate("").name == "public"
    assert tenants.authenticate("Bearer wrong") is None  # a bad key never falls back to anonymous
    assert not tenants.all["hashed"].may_use("deep") and tenants.all["acme"].may_use("deep")


def test_operators_and_prefix_cache_groups(tmp_path):
    """Tenants are not operators and each has its own cache salt unless the file says so;
    a metrics-only key authenticates no tenant."""
    text = GOOD.replace('weight = 2\n', 'weight = 2\nmetrics = true\nprefix_cache_group = "shared"\n')
    text = text.replace('tiers = ["fast"]\n', 'tiers = ["fast"]\nprefix_cache_group = "shared"\n')
    ts = load(write(tmp_path, text), BASE)
    by = {t.name: t for t in ts.tenants}
    assert by["acme"].operator and not by["hashed"].operator and not by["public"].operator
    assert by["acme"].cache_group == by["hashed"].cache_group != by["public"].cache_group
    plain = {t.name: t for t in load(write(tmp_path, GOOD), BASE).tenants}
    assert len({t.cache_group for t in plain.values()}) == 3 and all(t.cache_group for t in plain.values())
    tenants = Tenants(ts.tenants, metrics_keys=("sk-metrics",))
    assert tenants.metrics_key("Bearer sk-metrics") and not tenants.metrics_key("Bearer sk-acme")
    assert tenants.authenticate("Bearer sk-metrics") is None
    assert not Tenants.open().keyed and Tenants((), metrics_keys=("k",)).keyed


@pytest.mark.parametrize("edit, line, text", [
    (('quality = 2', 'quality = "high"'), 11, "tiers.deep.quality: Input should be a valid number"),
    (('max_num_seqs = 8', 'max_num_seq = 8'), 12, "tiers.deep.max_num_seq: Extra inputs are not permitted"),
    (('model = "gemma3-270m"\n', ''), 9, "tiers.deep: give model (or adapter and base for a LoRA adapter tier)"),
    (('tiers = ["fast"]', 'tiers = ["fast", "turbo"]'), 23, "'turbo' is not a tier"),
    (('default_tier = "fast"', 'default_tier = "slow"'), 1, "default_tier: 'slow' is not a tier"),
    (('default_tier = "fast"', 'default_tier = "fast"\nbalanced_cost_weight = 11'), 2,
     "balanced_cost_weight: Input should be less than or equal to 10"),
    (('weight = 2', 'weight = 0'), 17, "tenants.acme.weight: Input should be greater than 0"),
    (('api_keys = ["sk-acme"]', 'api_keys = []'), 15, "tenants.acme: give api_keys"),
    (('anonymous = true\n', 'anonymous = true\napi_keys = ["k"]\n'), 26, "an anonymous tenant takes no API keys"),
    (('"sk-acme"', '"sk-hashed"'), 21, "uses an API key of tenant 'acme'"),
    (('prompt_price_per_mtok = 0.02', 'prompt_price_per_mtok = -1'), 6, "greater than or equal to 0"),
    (('quality = 1\n', 'quality = 1\nquality = 2\n'), 6, "invalid TOML"),
    (('max_num_seqs = 8', 'kv_cache_dtype = "fp8"'), 12, "tiers.deep.kv_cache_dtype: Input should be 'auto' or 'int8'"),
    (('max_num_seqs = 8', 'device = "gpu0"'), 12, "tiers.deep.device: String should match pattern"),
    (('max_num_seqs = 8', 'gpu_memory_utilization = 1.2'), 12,
     "tiers.deep.gpu_memory_utilization: Input should be less than or equal to 1"),
])
def test_errors_name_file_line_and_key(tmp_path, edit, line, text):
    message = load_error(tmp_path, GOOD, edit)
    assert text in message, message
    assert message.startswith(f"{tmp_path / 'tierlm.toml'}:{line}: "), message
    assert "sk-hashed" not in message and "sk-acme" not in message


def load_error(tmp_path, good: str, edit: tuple[str, str]) -> str:
    """The one-line ConfigError of `good` with `edit` applied."""
    bad = good.replace(*edit)
    assert bad != good
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as e:
        load(path, BASE)
    return str(e.value)


def test_engine_values_are_checked_with_the_tier_named(tmp_path):
    path = write(tmp_path, GOOD.replace("max_num_seqs = 8", "max_num_seqs = 8\nlong_prefill_chunk = 0\n"
                                        "kv_warm_gb = 0\nkv_cache_dtype = \"int8\""))
    tiers = load(path, BASE).tiers
    assert tiers[1].engine.cache.kv_warm_gb == 0 and tiers[1].engine.cache.kv_cache_dtype == "int8"
    assert tiers[0].engine.cache.kv_cache_dtype == "auto"
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.toml", BASE)


def test_tiers_choose_their_devices(tmp_path):
    """One TierSet may put a tier on a GPU and keep another on the CPU; the rest follow the flags."""
    text = GOOD.replace("max_num_seqs = 8", 'max_num_seqs = 8\ndevice = "cuda:1"\ngpu_memory_utilization = 0.5\n'
                                           "enforce_eager = true")
    fast, deep = load(write(tmp_path, text), BASE).tiers
    assert (deep.engine.device, deep.engine.gpu_memory_utilization, deep.engine.enforce_eager) == ("cuda:1", 0.5, True)
    assert (fast.engine.device, fast.engine.gpu_memory_utilization, fast.engine.enforce_eager) == ("cpu", 0.9, False)


def test_a_tier_may_draft_with_its_own_draft_model(tmp_path):
    drafted = GOOD.replace("kv_cache_gb = 0.25", 'kv_cache_gb = 0.25\nnum_speculative_tokens = 3\ndraft_model = "d"')
    fast, deep = load(write(tmp_path, drafted), BASE).tiers
    assert deep.engine.draft_model == "d" and deep.engine.scheduler.num_speculative_tokens == 3
    assert fast.engine.draft_model is None
    with pytest.raises(ConfigError, match=r"tierlm.toml:9: tiers.deep: a draft model needs num_speculative"):
        load(write(tmp_path, GOOD.replace("kv_cache_gb = 0.25", 'kv_cache_gb = 0.25\ndraft_model = "d"')), BASE)


ADAPTER_TIERS = GOOD.replace("[tenants.acme]", """\
[tiers.support]
adapter = "/adapters/support"
base = "fast"
quality = 3
completion_price_per_mtok = 0.1

[tiers.legal]
adapter = "/adapters/legal"
base = "fast"

[tenants.acme]""")


def test_adapter_tiers_share_their_base_tiers_engine(tmp_path):
    tiers = {t.name: t for t in load(write(tmp_path, ADAPTER_TIERS), BASE).tiers}
    fast, support = tiers["fast"], tiers["support"]
    assert fast.engine.lora.enabled and fast.engine.lora.max_loras == 2 and fast.engine.lora.modules == ()
    assert not tiers["deep"].engine.lora.enabled
    assert (support.lora_base, support.lora_path, support.quality) == ("fast", "/adapters/support", 3)
    assert support.engine == fast.engine and support.completion_price_per_mtok == 0.1


@pytest.mark.parametrize("edit,line,text", [
    (('base = "fast"\nquality = 3', 'base = "nope"\nquality = 3'), 15, "base 'nope' is not a model tier"),
    (('base = "fast"\nquality = 3', 'base = "legal"\nquality = 3'), 15, "base 'legal' is not a model tier"),
    (('base = "fast"\nquality = 3', 'quality = 3'), 15, "needs both adapter"),
    (('base = "fast"\nquality = 3', 'base = "fast"\nmax_num_seqs = 4'), 15, "drop max_num_seqs"),
])
def test_adapter_tier_errors(tmp_path, edit, line, text):
    message = load_error(tmp_path, ADAPTER_TIERS, edit)
    assert text in message and message.startswith(f"{tmp_path / 'tierlm.toml'}:{line}: tiers.support: "), message


def test_embedding_and_reasoning_tiers(tmp_path):
    text = GOOD + ('\n[tiers.vectors]\nmodel = "all-minilm-l6-v2"\npooling = "cls"\n'
                   '\n[tiers.think]\nmodel = "smollm2-135m"\nreasoning_parser = "qwen3"\n'
                   '\n[tiers.decoder_vectors]\nmodel = "smollm2-135m"\ntask = "embed"\n')
    tiers = {t.name: t for t in load(write(tmp_path, text), BASE).tiers}
    assert tiers["vectors"].engine.pooling == "cls" and tiers["vectors"].engine.task == "auto"
    assert tiers["decoder_vectors"].engine.task == "embed"
    assert tiers["think"].reasoning_parser == "qwen3" and tiers["fast"].reasoning_parser is None
    message = load_error(tmp_path, text, ('reasoning_parser = "qwen3"', 'reasoning_parser = "o1"'))
    assert "reasoning_parser" in message and "deepseek_r1" in message
    message = load_error(tmp_path, text, ('task = "embed"', 'task = "rerank"'))
    assert "task" in message
