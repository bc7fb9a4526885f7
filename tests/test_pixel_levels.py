"""Images as uint8 levels with the processor's table (``PixelLevels``): the same pixel values as the processor's
float32 ones, bit for bit on the host and on the device, the same tokens from every engine, a cache key that
includes the table, and bad levels or tables refused naming them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import gemma3_jax
from fixtures.hf_checkpoints import _row
from gemma3_jax.model.gemma3 import check_inputs
from gemma3_jax.model.pixels import PixelLevels, as_pixels, pixel_table
from gemma3_jax.preprocessing.processor import Processor
from gemma3_jax.runtime.batching import BatchEngine, Request
from gemma3_jax.runtime.engine import Engine

CACHE = 96
SIZE = 28  # the tiny model's image size


@pytest.fixture(scope="module")
def model(tiny_mm):
    return gemma3_jax.load_pretrained(tiny_mm[0], dtype=jnp.float32, progress=False)


def engine(model, **kw):
    return BatchEngine(model, **{**dict(max_batch=3, cache_length=CACHE, chunk_tokens=10, decode_steps=4,
                                        step_tokens=6), **kw})


def random_levels(n: int, seed: int, table=None) -> PixelLevels:
    rng = np.random.default_rng(seed)
    return PixelLevels(rng.integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8),
                       pixel_table(1 / 255, (0.5,) * 3, (0.5,) * 3) if table is None else table)


def prompt(pieces, seed: int) -> list[int]:
    return [2] + _row(pieces, CACHE, np.random.default_rng(seed))


@pytest.mark.parametrize("mean,std,rescale", [((0.5,) * 3, (0.5,) * 3, 1 / 255),
                                              ((0.48145466, 0.4578275, 0.40821073),
                                               (0.26862954, 0.26130258, 0.27577711), 1 / 255),
                                              ((0.1, 0.2, 0.3), (2.0, 0.7, 1e-3), 0.0037)])
def test_levels_are_the_processors_float_values(mean, std, rescale):
    """Looked up on the host or in a compiled call, a level table gives what the processor's float arithmetic
    gives for each pixel (computed here independently: float64 product, float32 rounding, float32 normalization)."""
    proc = Processor(image_size=40, image_mean=mean, image_std=std, rescale_factor=rescale)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (90, 31, 3), dtype=np.uint8)]
    levels, _ = proc.preprocess_levels(images)
    assert levels.levels.dtype == np.uint8 and levels.shape == (2, 3, 40, 40)
    want = []
    for im in images:
        resized = np.asarray(Image.fromarray(im).resize((40, 40), resample=proc.resample))
        x = (resized.astype(np.float64) * rescale).astype(np.float32)
        want.append(((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1))
    want = np.stack(want)
    np.testing.assert_array_equal(levels.to_float(), want)
    np.testing.assert_array_equal(proc.preprocess(images)[0], want)
    np.testing.assert_array_equal(np.asarray(jax.jit(as_pixels)(jax.device_put(levels))), want)


def test_levels_serve_what_float_pixels_serve(model):
    """A request whose images are levels gets the tokens it gets with the same images as float32 pixels: alone,
    beside a float request in one vision call, and from the static Engine."""
    ids = prompt([5, "img", 3, "img", 20], 1)
    px = random_levels(2, 1)
    floats = Request(ids, px.to_float(), max_new_tokens=10, stop_ids=())
    levels = Request(ids, px, max_new_tokens=10, stop_ids=())
    eng = engine(model)
    want = eng.submit(floats).result()
    eng.features.clear()
    assert eng.submit(levels).result() == want
    other_ids = prompt([2, "img", 9], 2)
    other = random_levels(1, 2).to_float()
    alone = eng.submit(Request(other_ids, other, max_new_tokens=10, stop_ids=())).result()
    eng.features.clear()
    encodes = eng.features.encodes
    a, b = eng.submit(levels), eng.submit(Request(other_ids, other, max_new_tokens=10, stop_ids=()))
    eng.step()  # both admitted together: one vision call over levels and float pixels
    assert eng.features.encodes == encodes + 3
    assert a.result() == want and b.result() == alone
    static = Engine(model, cache_length=CACHE, chunk=8)
    for pixels in (px, px.to_float()):
        out = np.concatenate(list(static.generate_ids([ids], pixels, max_new_tokens=10, stop_ids=())), axis=1)
        assert out[0].tolist() == want


def test_levels_logits_equal_float_logits(model):
    ids = np.asarray([prompt([4, "img", 6], 3)])
    px = random_levels(1, 3)
    np.testing.assert_array_equal(np.asarray(model(ids, px)), np.asarray(model(ids, px.to_float())))


def test_the_table_is_part_of_an_images_key(model):
    """The same levels under another table are another image (encoded again, other tokens); under an equal table
    (another array) the cached features are taken."""
    ids = prompt([5, "img", 20], 4)
    px = random_levels(1, 4)
    eng = engine(model)
    first = eng.submit(Request(ids, px, max_new_tokens=6, stop_ids=())).result()
    eng.submit(Request(ids, PixelLevels(px.levels.copy(), px.table.copy()), max_new_tokens=6, stop_ids=())).result()
    assert (eng.features.encodes, eng.features.hits) == (1, 1)
    other = PixelLevels(px.levels, pixel_table(1 / 255, (0.1, 0.5, 0.9), (0.3, 0.5, 0.2)))
    second = eng.submit(Request(ids, other, max_new_tokens=6, stop_ids=())).result()
    assert eng.features.encodes == 2 and second != first


def bad(levels=None, table=None):
    good = random_levels(1, 0)
    return PixelLevels(good.levels if levels is None else levels, good.table if table is None else table)


BAD = [
    (bad(levels=np.zeros((1, 3, SIZE, SIZE), np.int64)), ValueError, r"pixel_values\.levels must be a uint8 array"),
    (bad(levels=np.zeros((1, 3, SIZE, SIZE), np.float32)), ValueError, r"pixel_values\.levels must be a uint8 array"),
    (bad(levels=np.zeros((3, SIZE, SIZE), np.uint8)), ValueError, r"pixel_values\.levels must be a uint8 array .*"
                                                                    r"shape \(3, 28, 28\)"),
    (bad(levels=[[1, 2], [3]]), ValueError, r"pixel_values\.levels must be a uint8 array"),
    (bad(table=np.zeros((3, 255), np.float32)), ValueError, r"pixel_values\.table must be \[C, 256\]"),
    (bad(table=np.full((3, 256), np.nan, np.float32)), ValueError, r"pixel_values\.table holds NaN"),
    (bad(table=np.full((3, 256), "x")), TypeError, r"pixel_values\.table must be a float array"),
    (bad(table=np.zeros((3, 256), np.float64).astype(np.float16)), None, None),  # any finite float table is taken
    (bad(levels=np.zeros((1, 3, 16, 16), np.uint8)), ValueError, r"pixel_values must be \[num_images, 3, 28, 28\]"),
    (bad(levels=np.zeros((2, 3, SIZE, SIZE), np.uint8)), ValueError, r"2 images need 8 image tokens"),
]


@pytest.mark.parametrize("px,error,message", BAD, ids=["int64", "float32", "3d", "ragged", "table_255", "table_nan",
                                                       "table_str", "table_float16", "image_size", "image_count"])
def test_bad_levels_are_refused_naming_them(model, px, error, message):
    ids = prompt([3, "img", 2], 5)
    eng = engine(model)
    if error is None:
        eng.submit(Request(ids, px, max_new_tokens=2, stop_ids=())).result()
        return
    with pytest.raises(error, match=message):
        eng.submit(Request(ids, px, max_new_tokens=2, stop_ids=()))
    with pytest.raises(error, match=message):
        check_inputs(model.cfg, np.asarray([ids]), px)
    assert eng.stats()["queued"] == 0
