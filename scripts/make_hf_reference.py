"""Writes tests/data/hf_reference/: small random HF checkpoints and transformers' outputs.

  pip install -e '.[hf-test]' && python scripts/make_hf_reference.py

For each case of tests/hf_reference.py: the checkpoint as save_pretrained
writes it, inputs.npz and expected.npz (transformers' logits, and each
sparse layer's expert and dropped flag per token). tests/test_hf_convert.py
converts these with switchjax and compares, with or without torch. Run it
again only to change the cases; it replaces the directory.
"""
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import hf_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  root = hf_reference.REFERENCE_DIR
  shutil.rmtree(root, ignore_errors=True)
  for i, case in enumerate(hf_reference.CASES):
    path = os.path.join(root, case)
    hf_reference.build(case, path, seed=i)
    os.remove(os.path.join(path, "generation_config.json"))
    batch = hf_reference.inputs(seed=i)
    np.savez(os.path.join(path, "inputs.npz"), **batch)
    np.savez(os.path.join(path, "expected.npz"),
             **hf_reference.hf_outputs(path, batch))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{case}: {size / 1024:.0f} KiB in {path}")


if __name__ == "__main__":
  main()
