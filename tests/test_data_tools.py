"""The command-line tools, end to end on tiny inputs (each in its own process)."""
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from hvla.data import pipeline


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-m', *args], check=True, env=env, timeout=300,
                       capture_output=True, text=True)
  return out.stdout


def test_build_dataset_then_train_tokenizer(tmp_path):
  rows = []
  for i in range(12):
    buf = io.BytesIO()
    Image.new('RGB', (24, 20), (20 * i, 0, 0)).save(buf, 'JPEG')
    (tmp_path / f'{i}.jpg').write_bytes(buf.getvalue())
    rows.append({'image': f'{i}.jpg', 'caption': f'a red square number {i}'})
  rows.append({'image': 'gone.jpg', 'caption': 'missing'})
  (tmp_path / 'rows.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
  out = tmp_path / 'ds'
  stdout = _run('hvla.tools.build_dataset', f'--inputs={tmp_path}/*.jsonl',
                f'--out_dir={out}', '--shard_size=5', '--workers=1')
  report = json.loads(stdout[stdout.index('{'):])
  assert report['written'] == 12 and report['skipped'] == {'missing_image': 1}
  stdout = _run('hvla.tools.train_tokenizer', f'--dataset={out}', '--vocab_size=60')
  assert os.path.exists(out / 'tokenizer.model') and 'pieces' in stdout

  config = pipeline.default_data_config()
  config.dataset, config.views = str(out), dict(image=dict(size=16))
  batch = next(iter(pipeline.make_loader(config, split='train', global_batch_size=4,
                                         train=True, seed=0, process_index=0,
                                         process_count=1)))
  tok = pipeline.tokenizer_for(config)
  assert all(t.startswith('a red square number')
             for t in tok.decode(batch['tokens']['caption']))


def test_benchmark_prints_a_table(tmp_path):
  stdout = _run('hvla.tools.benchmark_data', f'--data_dir={tmp_path}', '--size=32',
                '--num_records=64', '--workers=0', '--batch_size=4', '--batches=2',
                '--warmup=1', '--repeats=2', '--accelerator_rates=100')
  row = [line for line in stdout.splitlines() if line.startswith('| 0 |')][-1]
  cells = [c.strip() for c in row.strip('|').split('|')]
  median, runs, per_worker, needed = float(cells[1]), cells[2], float(cells[3]), int(cells[4])
  assert median > 0 and len(runs.split(',')) == 2 and per_worker == median
  # The table rounds the rate; the worker count comes from the unrounded one.
  low, high = (int(np.ceil(100 / (per_worker + d))) for d in (0.5, -0.5))
  assert low <= needed <= high
