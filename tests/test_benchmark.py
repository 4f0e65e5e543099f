"""The benchmarks: contrastive strategies and the train step, on tiny sizes."""
import flax.linen as nn
import jax
import numpy as np
import pytest

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
  config = clip_vitb16.get_config('runlocal')
  config.batch_size = 16
  config.model.image.update(image_size=32, patch_size=8, width=32, depth=2, heads=2)
  config.model.text.update(width=32, depth=1, heads=2, max_len=16)
  config.model.embed_dim = 32
  config.data.text.max_len = 16
  for view in config.data.views.values():
    view.size = 32
  config.evals = {}
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
