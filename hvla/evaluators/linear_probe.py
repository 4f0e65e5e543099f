"""Linear probe and few-shot classification by closed-form ridge regression [ours].

Frozen image features of the train split are regressed onto one-hot labels,
`W = (Xc^T Xc / n + lambda I)^-1 Xc^T Yc / n` with Xc, Yc centred (the centring is the
bias), and the test split is classified by the largest regressed score. Closed form, so
no optimiser and no learning-rate sweep: the same solve for every objective. The CLIP
paper fits a logistic regression with a swept L2 weight instead [paper]; ridge is the
cheaper and deterministic stand-in. k-shot: k training examples per class, drawn with
`shot_seed` (a class with fewer examples keeps all it has).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hvla.evaluators import common


def default_config():
  return ml_collections.ConfigDict(dict(
      type="linear_probe",
      every_steps=5000,
      data={},  # Overrides of the training config.data (dataset name, views...).
      train_split="train",
      test_split=None,  # None: config.data.eval_split.
      view="image",  # Images are read from `images/<view>`.
      label="shape",  # Labels are read from `labels/<label>`.
      feature="embedding",  # 'embedding' (joint space) or 'pooled' (before the projection).
      batch_size=256,
      ridge_lambda=1e-2,  # Relative to the feature covariance, whose trace is <= 1 for
                          # normalised features.
      full=True,  # Also fit on the whole train split (metric `top1`).
      shots=(1, 5, 10),  # k-shot fits (metrics `<k>shot_top1`).
      shot_seed=0,
  ))


@functools.partial(jax.jit, static_argnames="num_classes")
def ridge_fit(features, labels, num_classes, ridge_lambda):
  """Weights [D, C] and bias [C] of ridge regression onto one-hot labels."""
  highest = jax.lax.Precision.HIGHEST
  x_mean = features.mean(axis=0)
  targets = jax.nn.one_hot(labels, num_classes)
  y_mean = targets.mean(axis=0)
  x, y, n = features - x_mean, targets - y_mean, features.shape[0]
  gram = jnp.matmul(x.T, x, precision=highest) / n + ridge_lambda * jnp.eye(x.shape[1])
  weights = jnp.linalg.solve(gram, jnp.matmul(x.T, y, precision=highest) / n)
  return weights, y_mean - jnp.matmul(x_mean, weights, precision=highest)


@jax.jit
def ridge_ranks(weights, bias, features, labels):
  """Rank of each example's label among the regressed class scores."""
  scores = jnp.matmul(features, weights, precision=jax.lax.Precision.HIGHEST) + bias
  return common.first_positive_rank(scores, labels[:, None] == jnp.arange(weights.shape[1]))


def few_shot_indices(labels, shots, seed):
  """Sorted indices of `shots` random examples of every class present in `labels`."""
  order = np.random.default_rng(seed).permutation(len(labels))
  return np.sort(np.concatenate([order[labels[order] == c][:shots] for c in np.unique(labels)]))


@common.register("linear_probe")
class LinearProbe(common.Evaluator):
  """Metrics: `top1`/`top5` (full train split), `<k>shot_top1`/`<k>shot_top5`; top5 only
  with more than 5 classes."""

  default_config = staticmethod(default_config)

  @staticmethod
  def reads(config):
    return ({"train_split": config.train_split, "test_split": config.test_split},
            (f"images/{config.view}", f"labels/{config.label}"))

  def __init__(self, name, config, **kwargs):
    super().__init__(name, config, **kwargs)
    if config.feature not in ("embedding", "pooled"):
      raise ValueError(f"config.evals.{name}.feature must be 'embedding' or 'pooled', "
                       f"got {config.feature!r}.")
    if not config.full and not config.shots:
      raise ValueError(f"config.evals.{name}: set full=True or some shots.")
    self.keys = self.reads(config)[1]
    self._features = common.per_example_step(
        functools.partial(_features, self.encoders, config.feature, *self.keys), self.mesh)

  def run(self, params):
    train, test = (common.collect(self._features, self.source.batches(split), self.mesh,
                                  self.keys, params)
                   for split in (self.config.train_split, self.config.test_split))
    num_classes = int(max(train["label"].max(), test["label"].max())) + 1
    subsets = {"": np.arange(len(train["label"]))} if self.config.full else {}
    subsets.update({f"{k}shot_": few_shot_indices(train["label"], k, self.config.shot_seed)
                    for k in self.config.shots})
    metrics = {}
    for prefix, rows in subsets.items():
      weights, bias = ridge_fit(train["feature"][rows], train["label"][rows], num_classes,
                                self.config.ridge_lambda)
      ranks = np.asarray(ridge_ranks(weights, bias, test["feature"], test["label"]))
      metrics.update({prefix + k: v for k, v in
                      common.top_k_accuracy(ranks, num_classes).items()})
    return self._scalars(metrics), {}


def _features(encoders, feature, image_key, label_key, params, batch):
  image = encoders.image(params, batch[image_key])
  return {"feature": image[feature], "label": batch[label_key]}
