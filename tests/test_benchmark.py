"""The benchmarks: contrastive strategies and the train step, on tiny sizes."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import tiny

from configs import clip_vitb16
from hvla import train
from hvla.tools import benchmark
from hvla.tools import benchmark_contrastive as bc


# ----------------------------------------------------------------------------------------
# The contrastive benchmark.
# ----------------------------------------------------------------------------------------
def clip_loss_reference(x, y, scale):
  """Symmetric InfoNCE of the rows of x and y, in float64 NumPy."""
  logits = scale * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
  def ce(z):
    z = z - z.max(1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))
  return (ce(logits) + ce(logits.T)) / 2


@pytest.mark.parametrize('strategy', ['dense', 'chunked', 'sharded'])
def test_compiled_case_computes_the_clip_loss_and_its_gradient(strategy):
  compiled, seconds = bc.compile_case(32, 4, strategy, block_size=8)
  x, y, scale = bc.make_inputs(32, 4, compiled.input_shardings[0])
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, rtol=1e-5)
  loss, (d_x, d_y, d_scale) = compiled(x, y, scale)
  assert seconds > 0 and float(scale) == pytest.approx(1 / 0.07)
  np.testing.assert_allclose(loss, clip_loss_reference(x, y, scale), rtol=1e-5)
  eps = 1e-3  # the scale's gradient against a central difference of the reference
  numeric = (clip_loss_reference(x, y, 1 / 0.07 + eps) -
             clip_loss_reference(x, y, 1 / 0.07 - eps)) / (2 * eps)
  np.testing.assert_allclose(d_scale, numeric, rtol=1e-3)
  assert d_x.shape == d_y.shape == (32, 4)
  if strategy == 'sharded':
    assert len(x.sharding.device_set) == jax.device_count()


def test_measure_times_every_strategy_and_chunked_memory_stays_small():
  n, block = 512, 16
  results = bc.measure(n, 8, ['dense', 'chunked', 'sharded'], block_size=block, repeats=2)
  by_name = {r['strategy']: r for r in results}
  for r in results:
    assert r['ran'] and r['n'] == n and r['compile_seconds'] > 0
    assert len(r['seconds_all']) == 2 and r['seconds_median'] > 0
    assert min(r['memory_per_device'][k] for k in ('peak', 'argument', 'output')) > 0
    assert r['rss_rise_bytes'] is None or r['rss_rise_bytes'] >= 0
  dense, chunked = by_name['dense'], by_name['chunked']
  assert dense['block'] is None and chunked['block'] == block
  assert by_name['sharded']['devices'] == jax.device_count()
  # Dense keeps [N, N] float32 logits; chunked only [N, block] at a time.
  assert dense['memory_per_device']['temp'] >= n * n * 4
  assert chunked['memory_per_device']['temp'] < dense['memory_per_device']['temp'] / 4
  table = bc.format_table(results)
  assert '| 512 | dense | - | 1 |' in table and '1.00x' in table


def test_a_case_over_the_memory_limit_is_compiled_but_not_run():
  result, = bc.measure(256, 8, ['dense'], repeats=3, max_run_bytes=1024)
  assert not result['ran'] and 'seconds_all' not in result
  assert result['memory_per_device']['temp'] >= 256 * 256 * 4
  assert 'not run (memory)' in bc.format_table([result])


def test_peak_rss_sees_an_allocation():
  baseline = bc.reset_peak_rss()
  if baseline is None:
    pytest.skip('no /proc/self/clear_refs')
  block = np.ones(64 * 2**20, np.uint8)  # written, so resident
  assert bc.peak_rss() - baseline >= block.nbytes * 0.9
  del block


# ----------------------------------------------------------------------------------------
# The train-step benchmark.
# ----------------------------------------------------------------------------------------
def tiny_config(**mesh):
  config = tiny.shrink(clip_vitb16.get_config('runlocal'), text_depth=1)
  config.mesh.update(mesh)
  return config


@pytest.fixture(scope='module')
def results():
  """A run on 8 data-parallel devices and an ahead-of-time compilation with FSDP."""
  def measure(fsdp, aot):
    return benchmark.measure(tiny_config(data=8 // fsdp, fsdp=fsdp, model=1), steps=2,
                             warmup=0, aot=aot, peak_tflops=1.0)
  return {'run': measure(1, aot=False), 'aot_fsdp': measure(8, aot=True)}


def test_measure_runs_steps(results):
  r = results['run']
  assert r['examples_per_sec'] > 0 and len(r['step_seconds_all']) == 2
  assert r['tflops_per_sec'] == pytest.approx(
      r['flops_per_step'] / r['step_seconds_median'] / 1e12)
  assert 0 < r['mfu'] == pytest.approx(r['tflops_per_sec'] / jax.device_count())
  assert 'examples/s' in benchmark.format_results(r)


def test_aot_compiles_without_running(results):
  r = results['aot_fsdp']
  assert r['flops_per_step'] > 0 and r['memory_per_device']['peak'] > 0
  assert r['devices'] == jax.device_count() and r['batch'] == 16
  assert 'step_seconds_median' not in r
  assert 'FLOPs per step' in benchmark.format_results(r)


def test_aot_sees_fsdp_sharding(results):
  data_parallel, fsdp = (results[k]['memory_per_device']['argument']
                         for k in ('run', 'aot_fsdp'))
  assert fsdp < data_parallel / 2


def test_model_flops_count_the_whole_batch_and_every_block(results):
  """XLA counts a compiled step per device, and a scanned stack of blocks once."""
  run, aot = results['run'], results['aot_fsdp']
  assert aot['flops_per_step'] == pytest.approx(run['flops_per_step'], rel=1e-3)
  assert run['xla_flops_per_device'] < run['flops_per_step'] / 4  # a quarter of the batch
  config = tiny_config(data=8, fsdp=1, model=1)
  config.model.scan = True
  setup = train.Setup(config)
  spec = train.global_batch_spec(benchmark.batch_spec(config.data, config.batch_size))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    scanned = jax.jit(setup.train_step_fn()).lower(setup.abstract_state(), spec)
  assert scanned.cost_analysis()['flops'] < run['flops_per_step'] * 0.8
  assert benchmark.model_flops(config, spec) == pytest.approx(run['flops_per_step'], rel=1e-3)


def test_apply_overrides_sets_nested_keys_on_a_copy():
  config = tiny_config()
  changed = benchmark.apply_overrides(
      config, ['model.remat=full', 'model.scan=True', 'model.image.patch_dropout=0.5'])
  assert (changed.model.remat, changed.model.scan) == ('full', True)
  assert changed.model.image.patch_dropout == 0.5
  assert (config.model.remat, config.model.scan) == ('none', False)
  with pytest.raises(ValueError, match="'model.rematt'"):
    benchmark.apply_overrides(config, ['model.rematt=full'])
  with pytest.raises(ValueError, match='key=value'):
    benchmark.apply_overrides(config, ['model.remat'])
  assert benchmark.parse_variant('rs:model.remat=full;model.scan=True') == (
      'rs', ['model.remat=full', 'model.scan=True'])
  with pytest.raises(ValueError, match='name:key=value'):
    benchmark.parse_variant('model.remat=full')


def test_variants_are_timed_interleaved_and_keep_the_model_flops():
  variants = [('config', []), ('remat', ['model.remat=full']), ('scan', ['model.scan=True'])]
  results = benchmark.measure_variants(tiny_config(data=8, fsdp=1, model=1), variants,
                                       steps=3, warmup=1, aot=False, peak_tflops=1.0)
  assert [r['name'] for r in results] == ['config', 'remat', 'scan']
  for r in results:
    assert len(r['step_seconds_all']) == 3 and r['examples_per_sec'] > 0
    # remat recomputes and scan loops, but the work the model needs is the same.
    assert r['flops_per_step'] == pytest.approx(results[0]['flops_per_step'], rel=1e-3)
  # XLA counts the recomputed forward pass of remat.
  assert results[1]['xla_flops_per_device'] > results[0]['xla_flops_per_device'] * 1.1
  table = benchmark.format_table(results)
  assert '| remat | model.remat=full |' in table and '| 1.00x |' in table


def test_matmul_peak_is_measured():
  assert 0 < benchmark.matmul_peak_tflops('float32', n=256, repeats=2) < 1e4


# ----------------------------------------------------------------------------------------
# The reference comparison: transformers' Flax CLIP on the same towers.
# ----------------------------------------------------------------------------------------
def test_reference_runs_the_same_towers():
  from hvla.tools import benchmark_reference as br
  config = clip_vitb16.get_config('runlocal')
  (configured, unclipped, theirs), = br.compare(config, batch=4, dtypes=['float32'],
                                                steps=2, warmup=1)
  assert configured['parameters'] == theirs['parameters'] > 10**6
  assert configured['devices'] == unclipped['devices'] == 1
  assert all(len(r['step_seconds_all']) == 2 for r in (configured, unclipped, theirs))
  table = br.format_table([(configured, unclipped, theirs)])
  assert '| float32 | transformers FlaxCLIPModel |' in table
  assert '| float32 | hvla (clip_norm=1.0) |' in table and 'hvla (clip_norm=0) |' in table
  config.model.image.pool = 'gap'
  with pytest.raises(ValueError, match="CLIP's towers only"):
    br.compare(config, batch=4, dtypes=['float32'], steps=1, warmup=0)


def test_transformers_clip_computes_hvla_clip_from_converted_parameters():
  """An independent implementation of the same towers: FlaxCLIPModel given hvla's
  parameters gives hvla's embeddings and logits."""
  from hvla import models
  from hvla.tools import benchmark_reference as br
  from transformers import FlaxCLIPModel
  config = clip_vitb16.get_config('runlocal').model
  config.text.vocab_size = 64
  model = models.get_model(config)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
  tokens = np.zeros((3, 32), np.int32)
  for i, n in enumerate((5, 17, 31)):  # EOS (3) ends each caption, then padding
    tokens[i, :n] = rng.integers(4, 64, n)
    tokens[i, n] = 3
  params = nn.unbox(model.init(jax.random.key(0), images[:1], tokens[:1]))['params']
  ours = model.apply({'params': params}, images, tokens)
  reference = FlaxCLIPModel(br.hf_clip_config(config), _do_init=False)
  theirs = reference(input_ids=tokens, pixel_values=images.transpose(0, 3, 1, 2),
                     attention_mask=(tokens > 0).astype(np.int32),
                     params=br.to_transformers(params, config.image.patch_size))
  np.testing.assert_allclose(ours[0]['embedding'], theirs.image_embeds, atol=2e-5)
  np.testing.assert_allclose(ours[1]['embedding'], theirs.text_embeds, atol=2e-5)
