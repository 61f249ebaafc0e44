"""Bitwise behaviour snapshot of the training step, for refactors that must change nothing.

  python scripts/snapshot_behaviour.py OUT.json   # run from a checkout root; compare two OUT files

For each case (routers, dispatches, expert impls, dropout, decoder-only, GSPMD and
shard_map meshes on 8 host devices) it trains 3 steps of the tiny preset and records a
SHA-256 of every leaf of the train state (paths included), the last loss, aux loss and
an eval loss. Equal hashes before and after a change: the same params, optimizer
state and rng draws.
"""
import hashlib
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.getcwd())

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from switchjax import data as data_lib
from switchjax import grid
from switchjax import train
from switchjax import validate


CASES = {
 "switch": ("switch_base", {}),
 "switch_einsum": ("switch_base", {"moe.dispatch": "einsum"}),
 "switch_dropless": ("switch_base", {"moe.dispatch": "dropless"}),
 "switch_batched_drop": ("switch_base", {"moe.expert_impl": "batched", "moe.expert_dropout": 0.3}),
 "switch_loop_drop": ("switch_base", {"moe.expert_impl": "loop", "moe.expert_dropout": 0.3, "model.activation": "relu"}),
 "gshard": ("gshard", {}),
 "gshard_random": ("gshard", {"moe.second_expert_policy": "random"}),
 "expert_choice": ("expert_choice", {}),
 "st_moe": ("st_moe", {}),
 "noisy": ("switch_base", {"moe.router": "noisy_topk", "moe.num_selected": 2}),
 "t5": ("t5_base", {}),
 "dec_only": ("switch_base", {"model.arch": "decoder_only", "moe.router_jitter": 0.1}),
 "mesh_gspmd": ("switch_base", {"mesh.data": 2, "mesh.expert": 4, "moe.expert_dropout": 0.2}),
 "mesh_shard_map": ("switch_base", {"mesh.data": 2, "mesh.expert": 4, "moe.expert_parallel": "shard_map", "moe.expert_dropout": 0.2}),
 "mesh_shard_map_model": ("switch_base", {"mesh.data": 2, "mesh.expert": 2, "mesh.model": 2, "moe.expert_parallel": "shard_map"}),
}


def snapshot(exp: str, overrides: dict) -> tuple:
  c = grid.apply_overrides(
      grid.load_experiment(f"experiments/{exp}.py", "tiny"),
      {**overrides, "train.num_steps": 3}, exp)
  c = validate.prepare(c)
  tr = train.make_trainer(c)
  state = tr.init_state()
  it = data_lib.make_iterator(c, "train", batch_size=c.train.batch_size)
  for _ in range(3):
    batch = train._global_batch(tr, next(it))  # pylint: disable=protected-access
    state, m = tr.train_step(state, batch)
  ev = tr.eval_step(state["params"], batch)
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(x).tobytes())
  return (h.hexdigest()[:16], float(m["loss"]), float(m["aux_loss"]),
          float(ev["loss"]))


def main(path: str) -> None:
  out = {}
  for name, (exp, overrides) in CASES.items():
    out[name] = snapshot(exp, overrides)
    print(name, out[name], flush=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
