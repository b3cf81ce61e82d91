"""The tiny TUNA config memorises 4 image-caption pairs: flow loss and CE both fall by more than 10x."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, ".")
from configs import tuna as tuna_configs  # noqa: E402
from unimm_jax.data import packing  # noqa: E402
from unimm_jax.data import tuna_sequences as ts  # noqa: E402
from unimm_jax.models import tuna  # noqa: E402
from unimm_jax.training import tuna_objective as obj  # noqa: E402

TOK = ts.TunaTokens(bos=1, eos=2, boi=3, eoi=4, image_pad=5)


def test_tiny_tuna_memorises_four_image_caption_pairs():
  cfg = tuna_configs.model_config("tiny")
  rng = np.random.default_rng(0)
  o = cfg.token_features
  images = [np.clip(rng.normal(size=(2, 2, o)), -1, 1).astype(np.float32) for _ in range(4)]
  captions = [[10 + 3 * i, 11 + 3 * i, 12 + 3 * i] for i in range(4)]
  samples = [ts.t2i_sample(c, img, TOK) for c, img in zip(captions, images)]
  samples += [ts.understanding_sample(img, [60], c, TOK) for c, img in zip(captions, images)]
  rows = [packing.pack_row(samples[i::2], 64) for i in range(2)]
  batch = {k: jnp.asarray(v) for k, v in ts.to_batch(rows, 4, o).items()}
  model = tuna.Tuna(cfg)
  params = model.init(jax.random.key(0), {**batch, "x_t": batch["x1"], "span_t": jnp.ones((2, 4))})["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  flow = obj.FlowConfig()
  norms = obj.normalizers(batch)

  @jax.jit
  def step(params, opt, key):
    def loss_fn(p):
      noised = obj.noise_batch(batch, key, flow)
      return obj.tuna_loss(model.apply({"params": p}, noised), noised, norms, flow, cfg.prediction)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, metrics

  history = []
  for i in range(300):
    params, opt, metrics = step(params, opt, jax.random.key(i))
    history.append({k: float(v) for k, v in metrics.items()})
  first = {k: np.mean([h[k] for h in history[:5]]) for k in history[0]}
  last = {k: np.mean([h[k] for h in history[-20:]]) for k in history[0]}
  assert last["loss_flow"] < first["loss_flow"] / 10, (first, last)
  assert last["loss_ntp"] < first["loss_ntp"] / 10, (first, last)
