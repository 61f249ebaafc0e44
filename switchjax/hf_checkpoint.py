"""A Hugging Face checkpoint directory as a switchjax config and params.

`read_hf` is what `switchjax.convert from-hf` and `train.init_from` read;
below `train` (it imports no training code), above the layouts that name the
tensors (`hf_layout`: T5 and Switch; `mixtral_layout`: Mixtral) and
`hf_files` (the files).
"""
from __future__ import annotations

from flax import nnx
import numpy as np

from switchjax import hf_files
from switchjax import hf_layout
from switchjax import mixtral_layout
from switchjax import model as model_lib
from switchjax import validate
from switchjax import weights


def read_hf(path: str):
  """(switchjax config, {param path: f32 array}, source record) of HF_DIR.

  The config is validated; the arrays are checked against its shapes.
  """
  hf = hf_files.read_config(path)
  names = hf.get("architectures") or []
  readable = hf_layout.ARCHITECTURES + (mixtral_layout.MIXTRAL,)
  if not any(a in readable for a in names):
    raise hf_layout.LayoutError(
        f"config.json architectures {names or '(none)'}: switchjax reads "
        f"{', '.join(readable)}")
  layout = (mixtral_layout if mixtral_layout.MIXTRAL in names else hf_layout)
  config = layout.config_from_hf(hf)
  tensors = hf_files.read_tensors(path)
  if layout is hf_layout:
    config.model.separate_encoder_embedding = (
        hf_layout.separate_encoder_embedding(tensors))
  try:
    validate.check_config(config)
  except validate.ConfigError as e:
    raise hf_layout.LayoutError(f"the converted config does not run: {e}"
                                ) from None
  abstract = nnx.eval_shape(
      lambda: model_lib.build_model(config, rngs=nnx.Rngs(0)))
  params = layout.params_from_hf(
      tensors, config, weights.shapes(nnx.state(abstract, nnx.Param)))
  source = {"architecture": (mixtral_layout.MIXTRAL if layout is mixtral_layout
                             else hf_layout.architecture(hf)),
            "config": hf,
            "dtypes": {n: hf_files.dtype_name(a) for n, a in tensors.items()}}
  if layout is mixtral_layout:
    return config, params, source  # to-hf refuses it: nothing to keep aside
  # Tensors the HF forward never reads (transformers 5's untied Switch keeps
  # a `shared.weight` of its own): kept aside, so that to-hf gives them back.
  back = hf_layout.named_as(hf_layout.hf_tensors(params, config), source["dtypes"])
  source["unused"] = {
      n: tensors[n] for n in hf_layout.EMBEDDING_ALIASES
      if n in back and not np.array_equal(np.asarray(back[n], np.float32),
                                          np.asarray(tensors[n], np.float32))}
  return config, params, source
