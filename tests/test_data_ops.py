"""Image ops: parameters within the configured ranges, recorded, and applied as recorded."""
import colorsys
import io

import numpy as np
import pytest
from PIL import Image

from hvla.data import config as config_lib
from hvla.data import ops

F = {name: i for i, name in enumerate(ops.AUG_FIELDS)}


def _image(w=64, h=48, seed=0):
  """A smooth random colour image (blur-friendly, no saturated extremes)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(30, 225, (h // 8, w // 8, 3), np.uint8)
  return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def _opts(**kw):
  return config_lib.view_options('v', kw)


def test_aug_fields_layout():
  assert len(ops.AUG_FIELDS) == 11
  np.testing.assert_array_equal(ops.identity_augs(), [0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize('w,h', [(64, 48), (30, 200)])
def test_random_resized_crop_stays_in_range(w, h):
  rng = np.random.default_rng(0)
  scale, ratio = (0.3, 0.6), (0.5, 2.0)
  fallbacks = 0
  for _ in range(500):
    x0, y0, x1, y1 = ops.random_resized_crop_box(rng, w, h, scale, ratio)
    assert 0 <= x0 < x1 <= 1 + 1e-6 and 0 <= y0 < y1 <= 1 + 1e-6
    area, aspect = (x1 - x0) * (y1 - y0), (x1 - x0) * w / ((y1 - y0) * h)
    assert ratio[0] - 1e-6 <= aspect <= ratio[1] + 1e-6
    if not scale[0] - 1e-6 <= area <= scale[1] + 1e-6:
      fallbacks += 1  # The centred fallback keeps the ratio, not the scale.
      assert (x0 + x1) / 2 == pytest.approx(0.5) and (y0 + y1) / 2 == pytest.approx(0.5)
  assert fallbacks < 50


def test_sample_augs_within_configured_ranges():
  opts = _opts(crop_scale=(0.5, 0.8), flip=True, color_jitter=0.5, color_jitter_p=0.8,
               grayscale_p=0.3, blur_p=0.4, blur_sigma=(0.5, 1.5))
  rng = np.random.default_rng(1)
  augs = np.stack([ops.sample_augs(rng, opts, 64, 64) for _ in range(2000)])
  area = (augs[:, 2] - augs[:, 0]) * (augs[:, 3] - augs[:, 1])
  assert np.all((area >= 0.5 - 1e-5) & (area <= 0.8 + 1e-5))
  assert set(np.unique(augs[:, F['flip']])) == {0, 1}
  assert abs(augs[:, F['flip']].mean() - 0.5) < 0.05
  for name in ('brightness', 'contrast', 'saturation'):
    assert np.all((augs[:, F[name]] >= 0.6) & (augs[:, F[name]] <= 1.4))
  assert np.all(np.abs(augs[:, F['hue']]) <= 0.1)
  jittered = augs[:, F['hue']] != 0
  assert abs(jittered.mean() - 0.8) < 0.05
  assert abs(augs[:, F['grayscale']].mean() - 0.3) < 0.05
  blurred = augs[:, F['blur_sigma']] > 0
  assert abs(blurred.mean() - 0.4) < 0.05
  assert np.all((augs[blurred, F['blur_sigma']] >= 0.5) & (augs[blurred, F['blur_sigma']]
                                                          <= 1.5))


def test_disabled_ops_are_never_drawn():
  rng = np.random.default_rng(2)
  augs = np.stack([ops.sample_augs(rng, _opts(), 50, 40) for _ in range(300)])
  np.testing.assert_array_equal(augs[:, 4:], np.tile(ops.identity_augs()[4:], (300, 1)))


def test_apply_crop_and_flip_match_the_recorded_box():
  img = _image()
  pixels = np.asarray(img)
  augs = ops.identity_augs((8 / 64, 16 / 48, 40 / 64, 48 / 48))  # A 32x32 pixel box.
  np.testing.assert_array_equal(ops.apply_augs(img, augs, 32), pixels[16:48, 8:40])
  augs[F['flip']] = 1
  np.testing.assert_array_equal(ops.apply_augs(img, augs, 32), pixels[16:48, 8:40, :][:, ::-1])


def _gray(x):
  return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def test_colour_ops_match_naive_formulas():
  img = _image(64, 64)
  x = np.asarray(img, np.float64)
  full = ops.identity_augs()

  def render(**changes):
    augs = full.copy()
    for k, v in changes.items():
      augs[F[k]] = v
    return ops.apply_augs(img, augs, 64).astype(np.float64)

  np.testing.assert_allclose(render(brightness=1.3), np.clip(x * 1.3, 0, 255), atol=1)
  mean = np.round(_gray(x).mean())
  np.testing.assert_allclose(render(contrast=0.6), np.clip(mean + 0.6 * (x - mean), 0, 255),
                             atol=1.5)
  gray = _gray(x)[..., None]
  np.testing.assert_allclose(render(saturation=0.4),
                             np.clip(gray + 0.4 * (x - gray), 0, 255), atol=1.5)
  np.testing.assert_allclose(render(grayscale=1), np.repeat(gray, 3, -1), atol=1)
  # Hue: a rotation about the gray axis, by Rodrigues' formula written out.
  theta = 2 * np.pi * 0.15
  k = np.ones(3) / np.sqrt(3)
  v = x.reshape(-1, 3)
  rotated = (v * np.cos(theta) + np.cross(k, v) * np.sin(theta)
             + np.outer(v @ k, k) * (1 - np.cos(theta)))
  np.testing.assert_allclose(render(hue=0.15), np.clip(rotated, 0, 255).reshape(x.shape),
                             atol=1)


def test_hue_rotation_turns_red_towards_green_and_keeps_gray():
  red, gray = np.array([200.0, 0, 0]), np.array([90.0, 90, 90])
  np.testing.assert_allclose(ops.hue_rotation(1 / 3) @ red, [0, 200, 0], atol=1e-9)
  np.testing.assert_allclose(ops.hue_rotation(0.37) @ gray, gray, atol=1e-9)
  h = colorsys.rgb_to_hsv(*(ops.hue_rotation(0.05) @ [0.8, 0.1, 0.1]))[0]
  assert 0 < h < 0.2  # Same direction as an HSV hue increase.


def test_blur_matches_a_naive_gaussian():
  img = _image(64, 64)
  augs = ops.identity_augs()
  augs[F['blur_sigma']] = 1.5
  blurred = ops.apply_augs(img, augs, 64).astype(np.float64)
  x = np.asarray(img, np.float64)
  t = np.arange(-6, 7)
  k = np.exp(-t ** 2 / (2 * 1.5 ** 2))
  k /= k.sum()
  pad = np.pad(x, ((6, 6), (6, 6), (0, 0)), mode='edge')
  rows = sum(k[i] * pad[i:i + 64] for i in range(13))
  naive = sum(k[i] * rows[:, i:i + 64] for i in range(13))
  inner = (slice(8, -8), slice(8, -8))  # Borders differ by padding convention only.
  assert np.abs(blurred[inner] - naive[inner]).mean() < 0.6
  assert np.abs(blurred[inner] - naive[inner]).max() < 4


def test_normalize_and_center_crop():
  px = np.array([[[0, 128, 255]]], np.uint8)
  out = ops.normalize(px, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
  np.testing.assert_allclose(out, [[[-1, (128 / 255 - 0.5) / 0.25, 1]]], atol=1e-6)
  assert out.dtype == np.float32
  np.testing.assert_allclose(ops.center_crop_box(200, 100), (0.25, 0, 0.75, 1))
  np.testing.assert_allclose(ops.center_crop_box(50, 100), (0, 0.25, 1, 0.75))


def test_boxes_to_view_by_hand():
  augs = ops.identity_augs((0.5, 0.0, 1.0, 0.5))  # The top-right quarter.
  boxes = np.array([[0.5, 0.0, 0.75, 0.25],   # Inside: (0, 0, 0.5, 0.5).
                    [0.4, 0.1, 0.6, 0.2],     # Half inside: (0, 0.2, 0.2, 0.4).
                    [0.0, 0.6, 0.3, 0.9],     # Outside.
                    [0.45, 0.0, 0.55, 0.1]])  # Half inside, kept at min_visible 0.5.
  view, visible = ops.boxes_to_view(boxes, augs, min_visible=0.5)
  np.testing.assert_array_equal(visible, [True, True, False, True])
  np.testing.assert_allclose(view[:3], [[0, 0, 0.5, 0.5], [0, 0.2, 0.2, 0.4], [0, 0, 0, 0]],
                             atol=1e-6)
  augs[F['flip']] = 1
  view, _ = ops.boxes_to_view(boxes[:1], augs)
  np.testing.assert_allclose(view, [[0.5, 0, 1, 0.5]], atol=1e-6)
  _, visible = ops.boxes_to_view(boxes[1:2], augs, min_visible=0.6)
  assert not visible[0]


def _bytes(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


@pytest.mark.parametrize('mode', ['L', 'CMYK', 'P', 'RGBA', 'LA', 'I;16'])
def test_decode_converts_modes_to_rgb(mode):
  base = _image(32, 32)
  if mode == 'I;16':
    img = Image.fromarray((np.asarray(base.convert('L'), np.uint16) * 257))
  else:
    img = base.convert(mode)
  out = ops.decode_image(_bytes(img, 'JPEG' if mode == 'CMYK' else 'PNG'))
  assert out.mode == 'RGB' and out.size == (32, 32)
  if mode in ('L', 'I;16'):
    np.testing.assert_allclose(np.asarray(out)[..., 0], np.asarray(base.convert('L')),
                               atol=1)


def test_decode_alpha_composites_on_white():
  img = Image.new('RGBA', (10, 10), (0, 0, 255, 0))
  img.putpixel((0, 0), (0, 0, 255, 255))
  out = np.asarray(ops.decode_image(_bytes(img, 'PNG')))
  np.testing.assert_array_equal(out[0, 0], [0, 0, 255])
  np.testing.assert_array_equal(out[5, 5], [255, 255, 255])


def test_decode_rejects_bad_input_with_a_reason():
  good = _bytes(_image(), 'JPEG')
  cases = {
      'undecodable': [b'', b'\x00garbage', good[:len(good) // 2]],
      'too_small': [_bytes(Image.new('RGB', (5, 100)), 'PNG')],
      'bad_aspect': [_bytes(Image.new('RGB', (1000, 20)), 'PNG')],
      'too_large': [_bytes(Image.new('RGB', (300, 300)), 'PNG')],
  }
  for reason, blobs in cases.items():
    for blob in blobs:
      with pytest.raises(ops.BadRecord) as e:
        ops.decode_image(blob, max_pixels=80_000)
      assert e.value.reason == reason


def test_decode_drafts_large_jpegs():
  big = _bytes(_image(800, 600), 'JPEG')
  img = ops.decode_image(big, draft_side=100)
  assert 100 <= min(img.size) < 600 and img.size[0] * 3 == img.size[1] * 4
  assert ops.decode_image(big).size == (800, 600)
