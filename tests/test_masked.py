"""ViCHA's masked image modelling ('mae' term): the loss on hand-computed cases, the sin-cos
positions, the decoder's placement of visible and mask tokens, the masked pass (the same
tower, no concept tokens), refused combinations, bfloat16 and a few train steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip_vitb16
from hvla import losses, sharding, train
from hvla.data import synthetic
from hvla.losses import masked
from test_models import build, make_inputs, run, tiny_config
import tiny

PIXELS = np.array([[[1.0, 3.0], [0.0, 0.0], [2.0, 6.0]]])  # 3 patches of 2 values
MASK = np.array([[1.0, 0.0, 1.0]])  # patch 1 visible, patches 0 and 2 masked
PREDICTION = np.array([[[1.0, 1.0], [9.0, 9.0], [0.0, 0.0]]])


def test_the_loss_on_a_hand_computed_case():
  # Raw pixels: patch 0 errs by (0, 2) -> 2, patch 2 by (2, 6) -> 20; patch 1 is visible.
  raw = masked.reconstruction_loss(PREDICTION, PIXELS, MASK, norm_pix=False)
  np.testing.assert_allclose(raw, (2.0 + 20.0) / 2, rtol=1e-6)
  # Standardised (unbiased variance): both masked patches become (-1, 1) / sqrt(2);
  # (1, 1) errs by 1 -/+ 1/sqrt(2) -> 1.5, (0, 0) by 1/sqrt(2) each -> 0.5.
  normed = masked.reconstruction_loss(PREDICTION, PIXELS, MASK, norm_pix=True)
  np.testing.assert_allclose(normed, (1.5 + 0.5) / 2, rtol=1e-5)


def test_the_loss_averages_masked_patches_over_the_batch():
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 5, 4))
  prediction = rng.normal(size=(3, 5, 4))
  kept = np.array([[0, 3], [1, 2], [2, 4]])
  mask = np.ones((3, 5))
  np.put_along_axis(mask, kept, 0.0, axis=1)
  np.testing.assert_array_equal(masked.kept_indices(jnp.asarray(mask), 2), kept)
  want, count = 0.0, 0
  for b in range(3):
    for p in range(5):
      if p in kept[b]:
        continue
      t = pixels[b, p]
      t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
      want += np.mean((prediction[b, p] - t) ** 2)
      count += 1
  got = masked.reconstruction_loss(prediction, pixels, mask)
  np.testing.assert_allclose(got, want / count, rtol=1e-5)


def test_sincos_positions_by_hand():
  table = masked.sincos_positions(4, (2, 3))
  assert table.shape == (7, 4)
  np.testing.assert_array_equal(table[0], 0.0)  # the class token
  # width 4: one frequency (1.0) per half; patch (row 1, column 2) is raster index 5.
  np.testing.assert_allclose(table[1 + 5], [np.sin(2), np.cos(2), np.sin(1), np.cos(1)],
                             rtol=1e-6)
  np.testing.assert_allclose(table[1 + 0], [0, 1, 0, 1], atol=1e-7)
  with pytest.raises(ValueError, match="divisible by 4"):
    masked.sincos_positions(6, (2, 2))


def test_the_decoder_puts_visible_tokens_in_place_and_mask_tokens_elsewhere():
  """Without blocks each output position reads only its own input: the masked ones
  depend on the mask token and position alone."""
  decoder = masked.Decoder(width=8, depth=0, heads=2, mlp_ratio=2.0, out_dim=5)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
  kept = jnp.asarray([[0, 3], [1, 2]])
  params = decoder.init(jax.random.PRNGKey(0), tokens, kept, (2, 2))
  out = decoder.apply(params, tokens, kept, (2, 2))
  other = decoder.apply(params, tokens * 2.0 + 1.0, kept, (2, 2))
  assert out.shape == (2, 4, 5)
  for b, visible in enumerate([[0, 3], [1, 2]]):
    for p in range(4):
      same = np.allclose(out[b, p], other[b, p], atol=1e-6)
      assert same == (p not in visible), (b, p)


def test_the_masked_pass_is_the_same_tower_on_the_kept_patches():
  model, variables = build(tiny_config(concept_depth=1))
  images, _ = make_inputs()
  rngs = {"dropout": jax.random.PRNGKey(3)}
  out = run(model, variables, images, method="encode_image_masked", rngs=rngs)
  assert out["tokens"].shape == (2, 1 + 4, 32) and out["mask"].shape == (2, 16)
  assert out["pixels"].shape == (2, 16, 4 * 4 * 3)
  np.testing.assert_array_equal(out["mask"].sum(1), [12, 12])
  kept = masked.kept_indices(out["mask"], 4)
  # Keeping every patch gives the whole tower's class token and patch tokens.
  whole = run(model, variables, images, method="encode_image")
  every = run(model, variables, images, method="encode_image_masked", rngs=rngs,
              mask_ratio=0.0)
  np.testing.assert_array_equal(every["mask"], 0.0)
  np.testing.assert_allclose(every["tokens"][:, 1:], whole["tokens"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(every["tokens"][:, 0], whole["pooled"], rtol=1e-5, atol=1e-5)
  # The pixels are the raster-order patches; the kept tokens are those of the kept
  # patches alone: the tower on a batch of their pixels laid out as the whole grid
  # cannot see the others, so changing a masked patch's pixels changes nothing.
  patches = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
  np.testing.assert_allclose(out["pixels"], patches, rtol=1e-6)
  first_masked = int(np.argmax(np.asarray(out["mask"][0])))
  row, col = divmod(first_masked, 4)
  changed = images.at[0, 4 * row:4 * row + 4, 4 * col:4 * col + 4].add(5.0)
  again = run(model, variables, changed, method="encode_image_masked", rngs=rngs)
  np.testing.assert_array_equal(again["mask"], out["mask"])
  np.testing.assert_allclose(again["tokens"], out["tokens"], rtol=1e-6, atol=1e-6)
  assert kept.shape == (2, 4)


def mae_config(**options):
  config = clip_vitb16.get_config("runlocal")
  tiny.shrink(config, batch_size=8)
  config.objective.terms.mae = losses.term_config(
      "mae", decoder_width=16, decoder_depth=1, decoder_heads=2, **options)
  return config


def test_refused_combinations_name_the_problem():
  config = mae_config()
  config.model.pyramid.leff = True
  with pytest.raises(ValueError, match="LeFF blocks convolve the full patch grid"):
    train.Setup(config)
  with pytest.raises(ValueError, match="mask_ratio"):
    masked.MaskedImageModelling(mask_ratio=1.0)
  with pytest.raises(ValueError, match="divisible by 4"):
    masked.MaskedImageModelling(decoder_width=18, decoder_heads=2)


def test_the_objective_reads_the_masked_pass_without_concepts():
  config = mae_config()
  config.model.concept_depth = 1
  config.objective.terms.clip.concepts = "concepts"
  obj = losses.get_objective(config.objective)
  assert set(obj.passes) == {"encode_image(images/image, tokens/concepts)",
                             "encode_text(tokens/caption)",
                             "encode_image_masked(images/image, mask_ratio=0.75)"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_few_steps_lower_the_reconstruction_loss(dtype):
  config = mae_config()
  config.model.dtype = dtype
  config.objective.terms.clip.weight = 0.0
  config.optimizer.lr = 3e-3
  setup = train.Setup(config)
  state = setup.init_state()
  decoder = state["params"]["objective"]["mae"]["decoder"]
  assert decoder["mask_token"].shape == (16,) and "block_0" in decoder
  spec = synthetic.batch_spec(config.data, config.batch_size)
  batch = sharding.make_global_batch(
      synthetic.batch(spec, config.model.text.vocab_size, seed=0), setup.mesh)
  step = setup.compile_train_step(train.global_batch_spec(
      synthetic.batch(spec, config.model.text.vocab_size, seed=0)))
  seen = []
  for _ in range(6):
    state, metrics = step(state, batch)
    seen.append(float(metrics["mae/loss"]))
  assert np.all(np.isfinite(seen)) and seen[-1] < seen[0], seen
