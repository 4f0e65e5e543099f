"""The towers that every reference trainer can build: CLIP's."""


def check_clip_towers(model_config):
  """Raises unless `config.model` has CLIP's towers, the only ones the reference
  trainers can build: a class-token ViT and an EOT-pooled text transformer."""
  image, text = model_config.image, model_config.text
  if image.name != "vit" or text.name != "transformer" or image.pool != "cls" or (
      text.pooling != "eot"):
    raise ValueError("The reference covers CLIP's towers only: model.image.name='vit' "
                     "with pool='cls', model.text.name='transformer' with pooling='eot'.")
