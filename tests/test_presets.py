"""Named configs of the released Gemma-3 sizes: the 270M equals the real checkpoint's config, and every size has
the parameter count Google publishes for it."""

import dataclasses
import math

import jax.numpy as jnp
import pytest

from gemma3_jax.model.config import Gemma3Config, param_bytes
from gemma3_jax.model.presets import PRESETS, preset

pytestmark = pytest.mark.xdist_group("real_270m")  # the real 270M's worker


def test_270m_preset_is_the_real_config(real_270m):
    real, ours = Gemma3Config.from_pretrained(real_270m[0]), preset("gemma3_270m")
    assert math.isclose(real.text.rms_norm_eps, ours.text.rms_norm_eps, rel_tol=1e-6)  # float32 in the file
    assert dataclasses.replace(real.text, rms_norm_eps=ours.text.rms_norm_eps) == ours.text
    assert real.vision is None and ours.vision is None


@pytest.mark.parametrize("name,billions", [("gemma3_270m", 0.268), ("gemma3_1b", 1.0), ("gemma3_4b", 4.3),
                                           ("gemma3_12b", 12.2), ("gemma3_27b", 27.4)])
def test_parameter_counts(name, billions):
    assert name in PRESETS
    assert param_bytes(preset(name), jnp.bfloat16) / 2 / 1e9 == pytest.approx(billions, rel=0.01)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'gemma3_2b'; expected one of gemma3_270m"):
        preset("gemma3_2b")
