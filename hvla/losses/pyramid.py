"""PyramidCLIP (METHODS.md §1): six softened contrastive terms across three levels.

Levels: the global view G with the caption's summary T_s, the local view L with the
caption T, and the global view's regions R (through f2 only) with the object/attribute
tags T_OA. The six terms [recon], each a 'clip' term (symmetric InfoNCE over the global
batch with softened targets: 1 - alpha on the positive, alpha / (N - 1) on every
negative):

| term | pair | weight |
|---|---|---|
| peer_global | (G, T_s) | (1 - lam - mu) / 2 |
| peer_local | (L, T) | (1 - lam - mu) / 2 |
| cross_global_tags | (G, T_OA) | lam / 2 |
| cross_global_roi | (R, T_s) | lam / 2 |
| cross_local_tags | (L, T_OA) | mu / 2 |
| cross_local_roi | (R, T) | mu / 2 |

(R, T_OA) is left out, as in the paper. One image tower, one text tower and one logit
scale serve every level [paper]. The terms read five tower passes: G and R come from one
pass of the global view with its regions (f1 once), L, T_s, T and T_OA from one each.

[ours] An example whose view kept no region gets one region covering the whole view (in
`TwoTowers.encode_image_with_rois`), so R stays informative; the regions are those of the
global view (`config.data.box_view` must be the global view's name).
"""
from hvla.losses.objective import term_config

# name -> (image level, text field, weight group); the order of METHODS.md §1.
TERMS = {
    "peer_global": ("global", "summary", "peer"),
    "peer_local": ("local", "caption", "peer"),
    "cross_global_tags": ("global", "tags", "cross_global"),
    "cross_global_roi": ("roi", "summary", "cross_global"),
    "cross_local_tags": ("local", "tags", "cross_local"),
    "cross_local_roi": ("roi", "caption", "cross_local"),
}


def term_weights(lam, mu):
  """Weight of every term: (1 - lam - mu) / 2 for the peers, lam / 2 and mu / 2 for the
  global and local cross terms."""
  if not (lam >= 0 and mu >= 0 and lam + mu <= 1):
    raise ValueError(f"PyramidCLIP's lam and mu must be >= 0 with lam + mu <= 1, got "
                     f"lam={lam}, mu={mu}")
  group = {"peer": (1 - lam - mu) / 2, "cross_global": lam / 2, "cross_local": mu / 2}
  return {name: group[g] for name, (_, _, g) in TERMS.items()}


def terms(*, alpha=0.2, lam=1 / 3, mu=1 / 3, global_view="global", local_view="local"):
  """`config.objective.terms` of PyramidCLIP: six weighted 'clip' terms.

  alpha: softened-target mass on the negatives (0.2 [recon]; 0 is plain InfoNCE).
  lam, mu: weights of the global and local cross terms (1/3 each [recon]).
  global_view, local_view: the names of G and L in `config.data.views`.
  """
  image = {"global": dict(image_view=global_view, rois=True),
           "local": dict(image_view=local_view),
           "roi": dict(image_view=global_view, rois=True, image_output="roi_embedding")}
  weights = term_weights(lam, mu)
  return {name: term_config("clip", weight=weights[name], label_smoothing=alpha,
                            text_field=text, **image[level])
          for name, (level, text, _) in TERMS.items()}
