"""The benchmarks: contrastive strategies and the train step, on tiny sizes."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
import tiny

from configs import clip_vitb16
from hvla import train
from hvla.data import synthetic
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
  spec = train.global_batch_spec(synthetic.batch_spec(config.data, config.batch_size))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    scanned = jax.jit(setup.train_step_fn()).lower(setup.abstract_state(), spec)
  assert scanned.cost_analysis()['flops'] < run['flops_per_step'] * 0.8
  assert benchmark.model_flops(config, spec) == pytest.approx(run['flops_per_step'], rel=1e-3)


def test_largest_batch_is_the_last_that_fits_in_memory():
  """On 8 devices batches step by 8: with a budget between the compiled peaks of batches
  40 and 48, the search (from the config's 16: doubling, then bisection) returns 40."""
  config = tiny_config(data=8, fsdp=1, model=1)
  def peak(batch):
    case = benchmark.Case('probe', benchmark.apply_overrides(config, [f'batch_size={batch}']),
                          aot=True)
    return case.results['memory_per_device']['peak']
  p40, p48 = peak(40), peak(48)
  assert p40 < p48
  batch, peaks = benchmark.largest_batch(config, (p40 + p48) / 2)
  assert batch == 40 and sorted(peaks) == [16, 32, 40, 48, 64]
  assert peaks[40] == p40 and peaks[48] == p48
  nothing, tried = benchmark.largest_batch(config, memory_bytes=1)
  assert nothing == 0 and sorted(tried) == [8, 16]


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


def test_another_config_is_measured_alongside_with_its_flop_ratio():
  clip = benchmark.load_config_file('configs/clip_vitb16.py:runlocal')
  assert clip.batch_size == 64 and set(clip.objective.terms) == {'clip'}
  with pytest.raises(FileNotFoundError, match='No config file'):
    benchmark.load_config_file('configs/nope.py')
  pyramid = tiny.shrink(benchmark.load_config_file('configs/pyramid_vitb16.py:runlocal'),
                        text_depth=1)
  results = benchmark.measure_variants(tiny_config(), [('config', [])], steps=1, warmup=0,
                                       aot=True, others=[('pyramid', pyramid)])
  ratio = results[1]['flops_per_step'] / results[0]['flops_per_step']
  assert ratio > 1.5  # two views, three texts and the ROI pass against one view, one text
  assert '| pyramid | (another config) |' in benchmark.format_table(results)
  assert f'| {ratio:.2f}x |' in benchmark.format_table(results)


def test_lowered_flops_and_parameter_count_by_hand():
  a = jax.ShapeDtypeStruct((8, 16), np.float32)
  b = jax.ShapeDtypeStruct((16, 4), np.float32)
  assert benchmark.lowered_flops(lambda x, y: x @ y, a, b) == 2 * 8 * 16 * 4
  tree = {'w': np.zeros((3, 4)), 'b': [np.zeros(5), jax.ShapeDtypeStruct((2,), np.float32)]}
  assert benchmark.parameter_count(tree) == 19


def test_matmul_peak_is_measured():
  assert 0 < benchmark.matmul_peak_tflops('float32', n=256, repeats=2) < 1e4


# ----------------------------------------------------------------------------------------
# The reference comparison: transformers' Flax CLIP on the same towers.
# ----------------------------------------------------------------------------------------
def test_reference_runs_the_same_towers():
  from benchmarks import reference as br
  config = clip_vitb16.get_config('runlocal')
  (configured, unclipped, theirs), = br.compare(config, batch=4, dtypes=['float32'],
                                                steps=2, warmup=1)
  assert configured['parameters'] == theirs['parameters'] > 10**6
  assert configured['devices'] == unclipped['devices'] == 1
  assert all(len(r['step_seconds_all']) == 2 for r in (configured, unclipped, theirs))
  # The same function: the reference's lowered step counts hvla's FLOPs to within the
  # optimizer's and the loss's element-wise work.
  assert theirs['flops_per_step'] == pytest.approx(configured['flops_per_step'], rel=0.02)
  table = br.format_table([(configured, unclipped, theirs)])
  assert '| float32 | transformers FlaxCLIPModel | 1,722,369 |' in table
  assert '| float32 | hvla (clip_norm=1.0) |' in table and 'hvla (clip_norm=0) |' in table
  config.model.image.pool = 'gap'
  with pytest.raises(ValueError, match="CLIP's towers only"):
    br.compare(config, batch=4, dtypes=['float32'], steps=1, warmup=0)
  with pytest.raises(ValueError, match="Unknown reference 'open_clip'"):
    br.make_reference('open_clip', config, None, None, 'float32')


def test_transformers_clip_computes_hvla_clip_from_converted_parameters():
  """An independent implementation of the same towers: FlaxCLIPModel given hvla's
  parameters gives hvla's embeddings and logits."""
  from hvla import models
  from benchmarks import reference_transformers as rt
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
  reference = FlaxCLIPModel(rt.hf_clip_config(config), _do_init=False)
  theirs = reference(input_ids=tokens, pixel_values=images.transpose(0, 3, 1, 2),
                     attention_mask=(tokens > 0).astype(np.int32),
                     params=rt.to_transformers(params, config.image.patch_size))
  np.testing.assert_allclose(ours[0]['embedding'], theirs.image_embeds, atol=2e-5)
  np.testing.assert_allclose(ours[1]['embedding'], theirs.text_embeds, atol=2e-5)


# ----------------------------------------------------------------------------------------
# The big_vision reference: its CLIP from a checkout (it is not on a package index). The
# tests that run it need HVLA_BIG_VISION_DIR, the root of a big_vision clone.
# ----------------------------------------------------------------------------------------
BIG_VISION_DIR = os.environ.get('HVLA_BIG_VISION_DIR')
needs_big_vision = pytest.mark.skipif(
    not BIG_VISION_DIR, reason='HVLA_BIG_VISION_DIR (a big_vision checkout) is not set')


def test_big_vision_towers_have_hvla_sizes():
  from benchmarks import reference_big_vision as rbv
  config = clip_vitb16.get_config()
  args = rbv.two_towers_args(config.model, 'bfloat16')
  assert args['image'] == dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                               patch_size=(16, 16), pool_type='tok', head_zeroinit=False,
                               dtype_mm='bfloat16')
  assert args['text'] == dict(width=512, depth=12, num_heads=8, mlp_dim=2048,
                              vocab_size=49408, pool_type='last')
  assert args['out_dim'] == (512, 512)
  assert args['temperature_init'] == pytest.approx(1 / 0.07)
  assert rbv.parameter_difference(config.model) == 2 * 768 - 2 * 512
  opt = rbv.optimizer_config(config.optimizer, warmup_steps=5)
  assert opt.wd == pytest.approx(0.0005 * 0.1) and opt.grad_clip_norm == 1.0
  assert opt.optax.to_dict() == dict(b1=0.9, b2=0.98, eps=1e-8)
  config.optimizer.name = 'lamb'
  with pytest.raises(ValueError, match="mirrors AdamW, not 'lamb'"):
    rbv.optimizer_config(config.optimizer, warmup_steps=5)
  config.model.text.pooling = 'mean'
  with pytest.raises(ValueError, match="CLIP's towers only"):
    rbv.two_towers_args(config.model, 'float32')


def test_big_vision_dir_must_be_a_checkout(tmp_path):
  from benchmarks import reference_big_vision as rbv
  with pytest.raises(FileNotFoundError, match='not a big_vision checkout.*two_towers.py'):
    rbv.import_big_vision(str(tmp_path))


@needs_big_vision
def test_big_vision_optimizer_is_hvla_adamw():
  """big_vision's optimizer, as configured by `optimizer_config`, updates as optax's
  AdamW with hvla's hyperparameters, clipping, cosine schedule and kernel-only decay."""
  import optax
  from benchmarks import reference_big_vision as rbv
  _, bv_optax, _ = rbv.import_big_vision(BIG_VISION_DIR)
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': rng.normal(size=(4, 3)), 'bias': rng.normal(size=3)},
            't': rng.normal(size=1)}
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  opt, total = clip_vitb16.get_config().optimizer, 20
  tx, _ = bv_optax.make(rbv.optimizer_config(opt, warmup_steps=2), params,
                        sched_kw=dict(total_steps=total, batch_size=8))
  def lr(count):  # linear warm-up over 2 steps, then cosine to 0 at `total`
    progress = np.clip((count - 2) / (total - 2), 0, 1)
    return opt.lr * np.minimum(1, count / 2) * 0.5 * (1 + np.cos(np.pi * progress))
  decay = {'dense': {'kernel': True, 'bias': False}, 't': False}
  adamw = optax.chain(optax.clip_by_global_norm(opt.clip_norm),
                      optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                  weight_decay=opt.weight_decay, mask=decay))
  theirs, ours = (params, tx.init(params)), (params, adamw.init(params))
  for _ in range(4):
    grads = jax.tree.map(lambda x: 3 * rng.normal(size=x.shape).astype(np.float32), params)
    (p1, s1), (p2, s2) = theirs, ours
    u1, s1 = tx.update(grads, s1, p1)
    u2, s2 = adamw.update(grads, s2, p2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), u1, u2)
    theirs, ours = (optax.apply_updates(p1, u1), s1), (optax.apply_updates(p2, u2), s2)


@needs_big_vision
def test_big_vision_reference_trains_near_equal_towers():
  from benchmarks import reference as br
  from benchmarks import reference_big_vision as rbv
  config = clip_vitb16.get_config('runlocal')
  config.model.embed_dim = 64  # so that the towers' parameter counts differ
  (configured, theirs), = br.compare(config, batch=4, dtypes=['float32'], steps=2,
                                     warmup=1, reference='big_vision',
                                     big_vision_dir=BIG_VISION_DIR)
  assert configured['parameters'] - theirs['parameters'] == (
      rbv.parameter_difference(config.model)) == 128
  assert theirs['flops_per_step'] == pytest.approx(configured['flops_per_step'], rel=0.05)
  assert len(theirs['step_seconds_all']) == 2
  assert '| float32 | big_vision two_towers |' in br.format_table([(configured, theirs)])
