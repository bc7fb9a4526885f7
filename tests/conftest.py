import os
import shutil
import sys
import tempfile
from pathlib import Path


def _compile_fast() -> None:
    """The suite compiles hundreds of small programs and runs each a few times, so LLVM's optimizations cost more
    than they save (the test files took 12-25% longer with them). Set before JAX starts; the subprocesses tests
    start inherit it. Not where a CUDA plugin is installed: there it would slow the GPU kernels it compiles."""
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


_compile_fast()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))  # the repository root: fixtures/
jax.config.update("jax_default_matmul_precision", "highest")  # float32 parity: no reduced-precision dots

from fixtures import hf_checkpoints as hfc  # noqa: E402
from gemma3_jax.runtime import compile_cache  # noqa: E402


def pytest_configure(config):
    """One persistent compilation cache for the whole run, shared by the xdist workers and every subprocess a test
    starts (they inherit the environment): a program several tests or processes compile (a fixture's server started
    by each worker, engines rebuilt per case, CLI runs of one checkpoint) compiles once. Each run starts empty;
    tests of the cache itself set their own directory, and a cache the caller chose (or turned off) is kept."""
    if "PYTEST_XDIST_WORKER" not in os.environ and not os.environ.get(compile_cache.ENV):
        path = tempfile.mkdtemp(prefix="gemma3-jax-test-xla-")
        os.environ[compile_cache.ENV] = path
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    compile_cache.enable_compilation_cache()  # this process's own compiles too

def pytest_runtest_setup(item):
    """Under ``--dist loadgroup`` a test marked ``xdist_group`` must carry its group in its node id, which is what
    pytest-xdist schedules by: with pytest 9.2 it silently did not, and each worker built the groups' shared
    fixtures (the real 270M's conversion, ~80 s) again. Such tests fail, saying why, rather than lose that
    without a word."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail(f"--dist loadgroup did not group this test marked xdist_group: this pytest ({pytest.__version__}) "
                    "and pytest-xdist do not work together (see pyproject.toml's test extra)", pytrace=False)


TOL = 1e-4  # max |dlogit| <= TOL * max |logit|


def rel_err(ours, ref, valid=None) -> float:
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    diff = np.abs(ours - ref)
    if valid is not None:
        diff, ref = diff[valid], ref[valid]
    return float(diff.max() / np.abs(ref).max())


def summed_partials(got, splits: int, b: int, n: int, dtype):
    """A matrix-vector kernel's output checked for its shape and dtype ([splits, B, N] f32 partial sums when split,
    else [B, N] in ``dtype``) and returned as [B, N]."""
    if splits > 1:
        assert got.shape == (splits, b, n) and got.dtype == jnp.float32
        return got.sum(0)
    assert got.shape == (b, n) and got.dtype == dtype
    return got


def rel_norm(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (the kernels' measure); fails on NaN/inf in ``out``."""
    import jax.numpy as jnp
    import numpy as np

    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), "NaN/inf in kernel output"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


@pytest.fixture(scope="session")
def tiny_mm(tmp_path_factory):
    """(path, hf_model) of a tiny random multimodal Gemma-3 (7 layers, window 8, 4 soft tokens per image)."""
    path = tmp_path_factory.mktemp("tiny_mm")
    return path, hfc.make_multimodal(path, seed=0)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_text")
    return path, hfc.make_text_only(path, seed=1)


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A complete tiny multimodal checkpoint directory (model, tokenizer, processor files; no chat template)."""
    path = tmp_path_factory.mktemp("chat_ckpt")
    hfc.make_chat_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def chat_text_ckpt(tmp_path_factory):
    """The same, text-only."""
    path = tmp_path_factory.mktemp("chat_text_ckpt")
    hfc.make_chat_checkpoint(path, seed=1, text_only=True)
    return path


@pytest.fixture(scope="session")
def real_270m():
    """(path, hf_model, tokenizer) of the real Gemma-3 270M, converted once into a cache directory."""
    cache = Path(os.environ.get("GEMMA3_JAX_TEST_CACHE", Path.home() / ".cache" / "gemma3_jax_tests"))
    path = cache / "gemma3-270m-f32"
    model, tok = hfc.convert_gguf_270m(path)
    return path, model, tok
