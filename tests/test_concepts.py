"""ViCHA's visual concepts in the towers: the concept encoder's tokens appended after the
patches change the image embedding, their padding does not, they stay out of the patch
tokens, the mean-patch pooling and the LeFF's grid, and the f1 / f2 split still composes
to the whole tower with them; config errors name their key."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import clip_vitb16
from hvla import losses, models, train
from hvla.models import layers
from test_models import EOS, build, make_inputs, run, tiny_config
import tiny


def concepts(batch=2, length=6, seed=1):
  """Concept texts [B, length]: a few word pieces then EOS, zero padded."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, length), np.int32)
  for i in range(batch):
    n = 2 + i
    tokens[i, :n] = rng.integers(4, 64, size=n)
    tokens[i, n] = EOS
  return jnp.asarray(tokens)


def test_concept_parameters_exist_only_with_the_encoder():
  _, plain = build(tiny_config())
  model, variables = build(tiny_config(concept_depth=2))
  params = variables["params"]
  assert "concept_encoder" not in plain["params"] and "concept_proj" not in plain["params"]
  assert sorted(params["concept_encoder"]["encoder"]) == ["block_0", "block_1"]
  assert params["concept_proj"]["kernel"].shape == (32, 32)
  assert not model.concept_encoder.causal  # bidirectional, as BERT [paper]


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_concepts_change_the_embedding_but_not_the_patch_tokens_layout(pool):
  model, variables = build(tiny_config(concept_depth=2, **{"image.pool": pool}))
  images, _ = make_inputs()
  words = concepts()
  plain = run(model, variables, images, method="encode_image")
  with_concepts = run(model, variables, images, words, method="encode_image")
  other = run(model, variables, images, concepts(seed=7), method="encode_image")
  assert with_concepts["tokens"].shape == plain["tokens"].shape == (2, 16, 32)
  assert with_concepts["levels"].shape == (2, 2, 32)
  assert not np.allclose(with_concepts["embedding"], plain["embedding"], atol=1e-4)
  assert not np.allclose(with_concepts["embedding"], other["embedding"], atol=1e-4)
  if pool == "gap":  # the mean of the patch tokens only, never of the concept tokens
    np.testing.assert_allclose(with_concepts["pooled"], with_concepts["tokens"].mean(1),
                               rtol=1e-5, atol=1e-6)


def test_concept_padding_changes_nothing():
  model, variables = build(tiny_config(concept_depth=1))
  images, _ = make_inputs()
  words = concepts(length=6)
  padded = jnp.pad(words, ((0, 0), (0, 2)))
  a = run(model, variables, images, words, method="encode_image")
  b = run(model, variables, images, padded, method="encode_image")
  for key in ("embedding", "tokens", "levels"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_concept_tokens_follow_the_patches_without_positions():
  """The sequence entering block 0 is [class, patches + positions, concept tokens],
  pre-normed: built by hand from the model's own pieces."""
  model, variables = build(tiny_config(concept_depth=1))
  images, _ = make_inputs()
  words = concepts()
  params = variables["params"]
  tokens, count = run(model, variables, words, method="concept_tokens")
  np.testing.assert_array_equal(count, layers.valid_lengths(words))
  stem = run(model, variables, images, method="image_stem")
  extended = jax.jit(lambda v: model.apply(
      v, images, method=lambda m, x: m.img.stem(x, extra=tokens)))(variables)
  # LayerNorm is per token: the class and patch tokens are the plain stem's.
  np.testing.assert_allclose(extended[:, :17], stem, rtol=1e-5, atol=1e-6)
  want = nn.LayerNorm(epsilon=layers.LN_EPSILON).apply(
      {"params": params["img"]["pre_norm"]}, tokens)
  np.testing.assert_allclose(extended[:, 17:], want, rtol=1e-5, atol=1e-6)


def test_the_f1_f2_split_composes_with_concepts_and_a_leff():
  config = tiny_config(concept_depth=1, **{"pyramid.leff": True, "pyramid.f1_depth": 1,
                                           "pyramid.roi.source": "boxes"})
  model, variables = build(config)
  images, _ = make_inputs()
  words = concepts()
  rois = {"boxes": jnp.asarray([[[0.0, 0.0, 0.5, 0.5]]] * 2), "mask": jnp.ones((2, 1), bool)}
  whole = run(model, variables, images, words, method="encode_image")
  split = run(model, variables, images, rois, words, method="encode_image_with_rois")
  np.testing.assert_allclose(split["embedding"], whole["embedding"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(split["levels"], whole["levels"], rtol=1e-5, atol=1e-6)
  plain = run(model, variables, images, rois, method="encode_image_with_rois")
  assert not np.allclose(split["embedding"], plain["embedding"], atol=1e-4)
  # The regions' sequence has no concept tokens: with stored region features (no f1
  # patches pooled) the concepts leave it unchanged.
  config = tiny_config(concept_depth=1, **{"pyramid.roi.source": "features",
                                           "pyramid.roi.feature_dim": 8})
  model, variables = build(config)
  rois["features"] = jnp.ones((2, 1, 8))
  regions = [run(model, variables, images, rois, *w, method="encode_image_with_rois")
             for w in ((), (words,))]
  np.testing.assert_allclose(regions[0]["roi_embedding"], regions[1]["roi_embedding"],
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(regions[0]["embedding"], regions[1]["embedding"], atol=1e-4)


@pytest.mark.parametrize("changes, key", [
    (dict(concept_depth=-1), "model.concept_depth"),
    (dict(concept_depth=True), "model.concept_depth"),
])
def test_bad_concept_configs_name_their_key(changes, key):
  with pytest.raises(ValueError, match=key):
    models.get_model(tiny_config(**changes))


def test_concepts_need_a_vit():
  config = clip_vitb16.get_config("runlocal")
  config.model.image = dict(name="resnet", image_size=64, layers=(1, 1, 1, 1), width=16,
                            heads=8, output_dim=128, norm_groups=8)
  config.model.concept_depth = 2
  with pytest.raises(ValueError, match="model.concept_depth: concept tokens join a ViT"):
    models.get_model(config.model)


def test_a_term_reading_concepts_needs_the_encoder():
  config = clip_vitb16.get_config("runlocal")
  tiny.shrink(config)
  config.objective.terms.clip.concepts = "concepts"
  with pytest.raises(ValueError, match="terms.clip.concepts='concepts' needs the concept"):
    train.Setup(config)
  config.model.concept_depth = 1
  obj = losses.get_objective(config.objective)
  assert list(obj.passes) == ["encode_image(images/image, tokens/concepts)",
                              "encode_text(tokens/caption)"]
