r"""Trains a SentencePiece tokenizer (pad 0, unk 1, bos 2, eos 3) on a dataset's texts.

  python -m hvla.tools.train_tokenizer --dataset=/data/cc3m --vocab_size=32000

By default the model is written next to the data (DATASET_DIR/tokenizer.model), where
`config.data.text.tokenizer=None` finds it. hvla_shapes trains its own automatically.
"""
import os

from absl import app
from absl import flags

from hvla.data import pipeline
from hvla.data import sources
from hvla.data import tokenizer as tokenizer_lib

_DATASET = flags.DEFINE_string("dataset", None, "tfds name or dataset directory.",
                               required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir for a dataset name.")
_SPLIT = flags.DEFINE_string("split", "train", "Split whose texts are used.")
_FIELDS = flags.DEFINE_list("fields", ["caption", "summary", "tags"], "Text fields used.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 32_000, "Upper bound on the vocabulary.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram", "word", "char"],
                                "SentencePiece model type.")
_MAX_RECORDS = flags.DEFINE_integer("max_records", 2_000_000, "Records read at most.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "Model path; default: DATASET_DIR/tokenizer.model.")


def main(argv):
  del argv
  config = pipeline.default_data_config()
  config.dataset, config.data_dir = _DATASET.value, _DATA_DIR.value
  builder = sources.dataset_builder(config)
  output = _OUTPUT.value or os.path.join(builder.data_dir, sources.TOKENIZER_FILE)
  texts = sources.dataset_texts(builder, _SPLIT.value, _FIELDS.value, _MAX_RECORDS.value)
  tok = tokenizer_lib.train_tokenizer(texts, output, vocab_size=_VOCAB_SIZE.value,
                                      model_type=_MODEL_TYPE.value)
  print(f"wrote {output} with {tok.vocab_size} pieces")


if __name__ == "__main__":
  app.run(main)
