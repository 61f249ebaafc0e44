"""Every paper config loads with its presets and matches its paper."""
import functools
import glob
import os

import pytest

from switchjax import config_base
from switchjax import model
from switchjax import partitioning
from switchjax import validate

from conftest import ROOT
from conftest import experiment

NAMES = sorted(os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def get(name, preset=None):
  return experiment(name, preset)


@functools.lru_cache(maxsize=None)
def counts(name):
  return model.param_counts(get(name, "full"))


def test_the_paper_configs_are_all_there():
  assert set(NAMES) >= {"t5_base", "t5_large", "switch_base", "switch_large",
                        "switch_xxl", "switch_c", "gshard", "expert_choice",
                        "st_moe"}


@pytest.mark.parametrize("name", NAMES)
def test_presets_load_and_full_is_the_default(name):
  full = get(name, "full")
  assert get(name).to_dict() == full.to_dict()
  assert get(name, "").to_dict() == full.to_dict()
  tiny = get(name, "tiny")
  assert tiny.to_dict() != full.to_dict()
  # Every key exists in the schema: nothing added outside config_base.
  base = config_base.base_config().to_dict()
  for section, values in full.to_dict().items():
    if isinstance(values, dict):
      assert set(values) == set(base[section]), section


@pytest.mark.parametrize("name", NAMES)
def test_unknown_preset_raises_naming_the_valid_ones(name):
  with pytest.raises(ValueError, match=r"'hueg'.*'full', 'tiny'"):
    get(name, "hueg")


# Structure kept by `tiny`: what a researcher ablates must not change.
_STRUCTURE = [
    ("model", "arch"), ("model", "activation"), ("model", "tie_embeddings"),
    ("model", "dropout_rate"), ("model", "init_scale"),
    ("moe", "sparse_every"), ("moe", "router"), ("moe", "encoder_router"),
    ("moe", "decoder_router"), ("moe", "num_selected"),
    ("moe", "train_capacity_factor"), ("moe", "eval_capacity_factor"),
    ("moe", "aux_loss_coef"), ("moe", "z_loss_coef"), ("moe", "router_jitter"),
    ("moe", "second_expert_policy"), ("moe", "normalize_weights"),
    ("train", "optimizer"), ("train", "schedule")]


# What `tiny` is for: each paper's model, trained offline on a 2-core CPU in
# minutes. Budgets, not the preset's own numbers: at the ~70 GFLOP/s that
# training reaches on 2 cores, 3e13 FLOPs take about 7 minutes.
TINY_MAX_PARAMS = 10_000_000
TINY_MAX_TRAIN_FLOPS = 3e13  # 6 x active params x tokens, the whole run


def _tokens_per_step(c):
  d = c.data
  per_example = (d.inputs_length + d.targets_length
                 if c.model.arch == "encoder_decoder" else d.seq_length)
  return c.train.batch_size * per_example


@pytest.mark.parametrize("name", NAMES)
def test_tiny_keeps_the_structure_of_full(name):
  full, tiny = get(name, "full"), get(name, "tiny")
  for section, key in _STRUCTURE:
    assert tiny[section][key] == full[section][key], f"{section}.{key}"
  e = tiny.moe
  assert (e.num_experts == 0) == (full.moe.num_experts == 0)
  stacks = [tiny.model.num_decoder_layers]
  if tiny.model.arch == "encoder_decoder":
    stacks.append(tiny.model.num_encoder_layers)
  if e.num_experts:
    # Routing still chooses: more experts than a token (or an expert) takes.
    assert e.num_experts > e.num_selected
    assert e.num_experts > e.train_capacity_factor
    # Every stack keeps at least one sparse layer, as in full.
    for layers in stacks:
      assert any(model.is_sparse_layer(i, e.num_experts, e.sparse_every)
                 for i in range(layers))


@pytest.mark.parametrize("name", NAMES)
def test_tiny_trains_offline_on_a_small_cpu(name):
  tiny = get(name, "tiny")
  # Valid as it is, on one device and on the 8 of the tests' host.
  for devices in (1, 8):
    validate.prepare(tiny, num_devices=devices)
    partitioning.check_mesh(tiny, devices)
  # Nothing to download: the bundled corpus and vocabulary.
  assert tiny.data.name == "bundled" and tiny.data.vocab_path == ""
  # The CPU has no fast bfloat16.
  assert tiny.model.dtype == "float32"
  total, active = model.param_counts(tiny)
  assert total <= TINY_MAX_PARAMS
  t = tiny.train
  assert 6 * active * _tokens_per_step(tiny) * t.num_steps <= TINY_MAX_TRAIN_FLOPS
  # A learning curve: past warm-up, logged more often than evaluated, and
  # at least two evals and two checkpoints.
  assert t.warmup_steps < t.num_steps
  assert t.log_every < t.eval_every
  assert t.num_steps // t.eval_every >= 2
  assert t.num_steps // t.checkpoint_every >= 2


@pytest.mark.parametrize("preset", ["full", "tiny"])
@pytest.mark.parametrize("name", NAMES)
def test_group_size_divides_the_tokens_of_a_batch(name, preset):
  c = get(name, preset)
  if not c.moe.num_experts:
    pytest.skip(f"{name} is dense: no routing groups")
  for length in (c.data.inputs_length, c.data.targets_length):
    tokens = c.train.batch_size * length
    assert tokens % min(c.moe.group_size, tokens) == 0, (length, c.moe.group_size)


# Paper values ----------------------------------------------------------------

_SWITCH_PROTOCOL = {  # Fedus et al. 2021 (§2.2, §2.4, footnote 10) and T5
    "model.init_scale": 0.1, "model.dtype": "bfloat16", "model.dropout_rate": 0.1,
    "data.inputs_length": 512, "data.targets_length": 114,
    "train.batch_size": 2048, "train.optimizer": "adafactor",
    "train.schedule": "rsqrt", "train.learning_rate": 0.01,
    "train.warmup_steps": 10_000,
}
_SWITCH = dict(_SWITCH_PROTOCOL, **{
    "moe.router": "switch", "moe.aux_loss_coef": 0.01,
    "moe.router_jitter": 0.01, "moe.z_loss_coef": 0.0})

PAPER = {
    # Table 9 of Fedus et al. 2021: d_model, d_ff, heads, layers, experts.
    "t5_base": dict(_SWITCH_PROTOCOL, **{
        "model.d_model": 768, "model.d_ff": 2048, "model.num_heads": 12,
        "model.num_encoder_layers": 12, "moe.num_experts": 0}),
    "t5_large": dict(_SWITCH_PROTOCOL, **{
        "model.d_model": 1024, "model.d_ff": 2816, "model.num_heads": 16,
        "model.num_encoder_layers": 24, "moe.num_experts": 0}),
    "switch_base": dict(_SWITCH, **{
        "model.d_model": 768, "model.d_ff": 2048, "model.num_heads": 12,
        "model.num_encoder_layers": 12, "model.activation": "gated_gelu",
        "moe.num_experts": 128, "moe.sparse_every": 2,
        "moe.train_capacity_factor": 1.25}),
    "switch_large": dict(_SWITCH, **{
        "model.d_model": 1024, "model.d_ff": 2816, "model.num_heads": 16,
        "model.num_encoder_layers": 24, "model.activation": "gated_gelu",
        "moe.num_experts": 128, "moe.sparse_every": 2}),
    "switch_xxl": dict(_SWITCH, **{
        "model.d_model": 4096, "model.d_ff": 10240, "model.num_heads": 64,
        "model.num_encoder_layers": 24, "model.activation": "gated_gelu",
        "moe.sparse_every": 2}),
    "switch_c": dict(_SWITCH, **{
        "model.d_model": 2080, "model.d_ff": 6144, "model.num_heads": 32,
        "model.num_encoder_layers": 15, "model.activation": "relu",
        "moe.num_experts": 2048, "moe.sparse_every": 1}),
    # Lepikhin et al. 2020, Table 1 and Appendix A.2.
    "gshard": {
        "model.d_model": 1024, "model.d_ff": 8192, "model.num_heads": 16,
        "model.head_dim": 128, "model.num_encoder_layers": 18,
        "model.num_decoder_layers": 18, "model.dtype": "float32",
        "moe.num_experts": 2048, "moe.sparse_every": 2, "moe.router": "gshard",
        "moe.second_expert_policy": "random", "train.optimizer": "adafactor"},
    # Zhou et al. 2022 (EC-CF2) in T5X's experts_choose_base layout.
    "expert_choice": {
        "moe.encoder_router": "expert_choice", "moe.decoder_router": "topk",
        "moe.num_selected": 2, "moe.train_capacity_factor": 2.0},
    # Zoph et al. 2022, ST-MoE-32B.
    "st_moe": {
        "model.d_model": 5120, "model.d_ff": 20480, "model.num_heads": 64,
        "model.head_dim": 128, "moe.num_experts": 64, "moe.sparse_every": 4,
        "moe.router": "topk", "moe.num_selected": 2,
        "moe.train_capacity_factor": 1.25, "moe.eval_capacity_factor": 2.0,
        "moe.aux_loss_coef": 1e-2, "moe.z_loss_coef": 1e-3},
    # Jiang et al. 2024 and mistralai/Mixtral-8x7B-v0.1's config.json.
    "mixtral": {
        "model.arch": "decoder_only", "model.vocab_size": 32000,
        "model.d_model": 4096, "model.d_ff": 14336, "model.num_heads": 32,
        "model.num_kv_heads": 8, "model.head_dim": 128,
        "model.num_decoder_layers": 32, "model.activation": "swiglu",
        "model.position_embedding": "rope", "model.rope_theta": 1e6,
        "model.norm_epsilon": 1e-5, "model.attention_window": 0,
        "model.tie_embeddings": False, "moe.num_experts": 8,
        "moe.sparse_every": 1, "moe.router": "topk", "moe.num_selected": 2,
        "moe.normalize_weights": True, "moe.dispatch": "dropless"},
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_full_preset_has_the_papers_hyperparameters(name):
  c = get(name, "full")
  for dotted, expected in PAPER[name].items():
    section, key = dotted.split(".")
    assert c[section][key] == expected, dotted


@pytest.mark.parametrize("dense,sparse", [("t5_base", "switch_base"),
                                          ("t5_large", "switch_large")])
def test_dense_baselines_are_flop_matched(dense, sparse):
  d, s = get(dense, "full"), get(sparse, "full")
  assert d.model.to_dict() == s.model.to_dict()
  assert d.moe.num_experts == 0 and s.moe.num_experts > 0
  assert d.data.to_dict() == s.data.to_dict()
  assert d.train.to_dict() == s.train.to_dict()


# Parameter counts against the papers, within 10%.
PAPER_PARAMS = {
    "switch_base": 7.41e9,  # Fedus et al. §4.2: 7410M
    "switch_large": 26.3e9,  # Table 9: 26B
    "switch_xxl": 395e9,  # Table 9
    "switch_c": 1571e9,  # Table 9
    # T5.1.1 shapes (GEGLU, untied embeddings): 248M. The Switch paper's
    # 223M is the original T5-Base (ReLU d_ff 3072, tied embeddings).
    "t5_base": 248e6,
    "t5_large": 739e6,  # Fedus et al. §4.1 (T5.1.1-Large is 783M)
    "gshard": 600e9,  # Lepikhin et al. Table 1
    "st_moe": 269e9,  # Zoph et al.: ST-MoE-32B
}


# Within 1 %, total and active: Jiang et al. 2024, "46.7B total, 12.9B active".
PAPER_PARAMS_1PCT = {"mixtral": (46.7e9, 12.9e9)}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_1PCT))
def test_total_and_active_parameters_match_the_paper(name):
  total, active = counts(name)
  want_total, want_active = PAPER_PARAMS_1PCT[name]
  assert total == pytest.approx(want_total, rel=0.01)
  assert active == pytest.approx(want_active, rel=0.01)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_matches_the_paper(name):
  total, active = counts(name)
  assert total == pytest.approx(PAPER_PARAMS[name], rel=0.10)
  assert active <= total


@pytest.mark.parametrize("dense,sparse", [("t5_base", "switch_base"),
                                          ("t5_large", "switch_large")])
def test_switch_applies_the_dense_baselines_parameters_per_token(dense, sparse):
  # FLOP-matched: one expert per token, so only the routers are extra.
  dense_total, dense_active = counts(dense)
  _, sparse_active = counts(sparse)
  assert dense_active == dense_total
  c = get(sparse, "full")
  num_moe_layers = 2 * (c.model.num_encoder_layers // c.moe.sparse_every)
  routers = num_moe_layers * c.model.d_model * c.moe.num_experts
  assert sparse_active == dense_total + routers
