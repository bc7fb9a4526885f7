"""Tensor parallelism on 8 CPU devices: the model split over N = 2, 4, 8 gives what N = 1 gives.

JAX fixes its device count when it starts, so the checks run in a subprocess started with
``--xla_force_host_platform_device_count=8`` (this file is also that subprocess's script). The model: the tiny
multimodal config with 8 query heads over 1 or 2 KV heads (N > KV heads: copies), a window of 16 that the prompts
cross, two images, float32, random weights.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
TOL = 1e-5  # relative to the largest logit (float32; only the order of the partial sums changes)


def devices(n: int) -> str:
    """XLA_FLAGS for ``n`` CPU devices, keeping the run's own flags (tests/conftest.py)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()


def run_worker(check: str, *more: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=devices(8), JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, check, *more], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_logits_equal_one_device():
    """Prefill logits with images and past the window, and decode steps over the split KV cache (ring buffers
    wrapping), for N = 2, 4, 8 and 1 or 2 KV heads; int4 weights (a scale per 32 inputs, split with them) for N =
    2, 4."""
    errs = run_worker("logits")
    assert len(errs) == 16, errs
    for case, err in errs.items():
        assert err <= TOL, (case, err)


def test_vision_tower_runs_image_parallel():
    """Under a mesh the vision tower encodes each device's share of the images (no collective inside it) when they
    divide evenly, else every device encodes them all; the features equal one device's either way."""
    got = run_worker("vision")
    assert got["n2_i4"]["spec"][0] == "tp" and got["n4_i4"]["spec"][0] == "tp", got
    assert got["n8_i4"]["spec"] == [None, None, None] and got["n2_i3"]["spec"] == [None, None, None], got
    assert got["n2_i4"]["collectives"] == got["n4_i4"]["collectives"] == 0, got
    for case, r in got.items():
        assert r["err"] <= TOL, (case, r)


def test_one_all_reduce_per_block_half():
    """A split decode step and prefill sum partial products once after o and once after down in each layer, plus
    once for the embedding lookup over the split vocabulary: nothing else crosses devices."""
    got = run_worker("collectives")
    for case, ops in got["counts"].items():
        assert ops == {"all-reduce": 2 * got["layers"] + 1}, (case, ops)


def test_greedy_generation_and_batching_are_token_identical():
    got = run_worker("generate")
    assert got["engine"] and got["batch"], got


def test_bad_splits_are_refused():
    got = run_worker("errors")
    assert "does not divide the 8 query heads" in got["heads"]
    assert "needs 16 devices, but 8 are present" in got["devices"]
    assert "one must divide the other" in got["kv"]
    assert "tensor_parallel=8 splits the MLP width 128 into 16 per device, not a multiple of 32" in got["groups"]


def test_loading_streams_each_text_weight_to_its_shards(tmp_path):
    """load_pretrained(tensor_parallel=N) on a Hugging Face layout: every weight equals the one-device load split
    afterwards (bf16 and float32, unquantized, 8-bit and 4-bit: the quantized bytes and scales too, also from
    checkpoints stored quantized; N = 2 and 4: KV heads
    copied), no text weight is ever made one array (host or device) whole, and a NaN in one piece of a fused
    weight (a k_proj) is named, quantized or not."""
    got = run_worker("loading", str(tmp_path))
    assert got["mismatched"] == [], got["mismatched"]
    assert got["compared"] >= 8 * 60, got["compared"]
    assert got["whole_text_arrays"] == [], got["whole_text_arrays"]
    for mode, message in got["nan"].items():
        assert "layers.1.self_attn.k_proj.weight" in message and "NaN or Inf" in message, (mode, message)


def test_two_processes_give_one_process_logits(tmp_path):
    """Several hosts: 2 processes x 2 CPU devices on 127.0.0.1 (``initialize_distributed``, gloo collectives), the
    model split over all 4, give the logits of 1 process with 4 devices; both processes see the same."""
    import socket

    import numpy as np

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def start(pid, nproc):
        env = dict(os.environ, XLA_FLAGS=devices(4 // nproc),
                   JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
        return subprocess.Popen([sys.executable, __file__, "distributed", str(pid), str(nproc), str(port),
                                 str(tmp_path / f"logits_{nproc}_{pid}.npy")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    procs = [start(0, 2), start(1, 2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one = start(0, 1)
    assert one.wait(timeout=600) == 0, one.stderr.read()[-3000:]
    want = np.load(tmp_path / "logits_1_0.npy")
    for pid in (0, 1):
        got = np.load(tmp_path / f"logits_2_{pid}.npy")
        assert np.abs(got - want).max() <= TOL * np.abs(want).max()


def test_cli_tensor_parallel(tmp_path):
    """scripts/generate.py --tensor-parallel N on a checkpoint in Hugging Face's layout (4 query heads over 2 KV
    heads), torch-free: the same greedy text for N = 1, 2, int4 weights at N = 2; one-line errors
    for N = 3 and more devices than there are."""
    from fixtures import real_layout as rl

    model = rl.write_checkpoint(tmp_path / "it", "it")
    env = dict(os.environ, XLA_FLAGS=devices(8), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "torchless"), str(ROOT)]))

    def command(n, *more):
        return [sys.executable, str(ROOT / "scripts" / "generate.py"), "--model", str(model), "--prompt",
                "Describe the sea.", "--max-new-tokens", "8", "--temperature", "0", "--tensor-parallel", str(n), *more]

    def cli(n, *more):
        return subprocess.run(command(n, *more), env=env, capture_output=True, text=True, timeout=600)

    runs = {n: cli(n) for n in (1, 2)}  # N = 4 and 8 give N = 1's numbers in the worker checks above
    for n, r in runs.items():
        assert r.returncode == 0 and "Traceback" not in r.stderr, (n, r.stderr[-2000:])
    assert runs[1].stdout.strip() and runs[2].stdout == runs[1].stdout
    assert "per device (2): weights" in runs[2].stderr and "per device" not in runs[1].stderr
    # int4 through the CLI (its scales split with their groups of inputs; that N = 2, 4 give N = 1's logits with
    # int4 is the worker's "logits" check)
    int4 = cli(2, "--quantize", "int4")
    assert int4.returncode == 0 and "Traceback" not in int4.stderr and int4.stdout.strip(), int4.stderr[-2000:]
    assert "per device (2): weights" in int4.stderr and "(int4 weights;" in int4.stderr
    for n, match in ((3, "does not divide the 4 query heads"), (16, "needs 16 devices, but 8 are present")):
        r = cli(n)
        assert r.returncode == 2 and r.stderr.startswith("error:") and match in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr

    # two hosts of 2 devices each (the same command with --coordinator-address ...) print the same text
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = dict(env, XLA_FLAGS=devices(2))
    procs = [subprocess.Popen(command(4, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                                      "--process-id", str(i)), env=two, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        # the text alone: gloo's connection log (native code, file descriptor 1) goes to stderr
        assert out == runs[1].stdout, (out, runs[1].stdout)
    r = cli(2, "--num-processes", "2")
    assert r.returncode == 2 and "go together" in r.stderr, r.stderr[-2000:]


# ---- the subprocess ---------------------------------------------------------------------------------------
def _model(kv_heads: int, heads: int = 8, quantize: str | None = None):
    """The tiny model with 16-wide heads, or 32-wide with ``quantize`` (int4 groups 32 inputs of each head)."""
    import jax.numpy as jnp

    from benchmarks.common import small_config
    from benchmarks.random_init import random_model
    from gemma3_jax.model.quant import quantize_model

    cfg = small_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_heads=heads, num_kv_heads=kv_heads,
                                                                 head_dim=32 if quantize else 16))
    model = random_model(cfg, jnp.float32)
    return quantize_model(model, quantize) if quantize else model


def _inputs(cfg, seed=0, tokens=60):
    import numpy as np

    from benchmarks.common import make_pixels, make_prompt

    rng = np.random.default_rng(seed)
    return np.array([make_prompt(cfg, tokens, 2, rng)], np.int32), make_pixels(cfg, 2, rng)


def _logits() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.tensor_parallel import prompt_and_steps_logits as run  # prefill, then 12 decode steps' logits
    from gemma3_jax.model.sharding import tensor_parallel

    errs = {}
    for kv, mode, splits in ((1, None, (2, 4, 8)), (2, None, (2, 4, 8)), (2, "int4", (2, 4))):
        model = _model(kv, quantize=mode)
        ids, px = _inputs(model.cfg)
        want = np.asarray(jax.jit(run)(model, jnp.asarray(ids), jnp.asarray(px)))
        case = f"{kv}_{mode}" if mode else kv
        for n in splits:
            got = np.asarray(jax.jit(run)(tensor_parallel(model, n), jnp.asarray(ids), jnp.asarray(px)))
            errs[f"kv{case}_n{n}_prefill"] = float(np.abs(got[:ids.shape[1]] - want[:ids.shape[1]]).max()
                                                 / np.abs(want).max())
            errs[f"kv{case}_n{n}_decode"] = float(np.abs(got[ids.shape[1]:] - want[ids.shape[1]:]).max()
                                                / np.abs(want).max())
    return errs


def _vision() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import make_pixels
    from gemma3_jax.model.sharding import tensor_parallel

    model = _model(2)
    encode = jax.jit(lambda m, px: m.projector(m.vision(px)))
    out = {}
    for images in (4, 3):
        px = jnp.asarray(make_pixels(model.cfg, images, np.random.default_rng(images)))
        want = np.asarray(encode(model, px))
        for n in ((2, 4, 8) if images == 4 else (2,)):
            split = tensor_parallel(model, n)
            feats = encode(split, px)
            spec = list(feats.sharding.spec) + [None] * (feats.ndim - len(feats.sharding.spec))
            hlo = encode.lower(split, px).compile().as_text()
            out[f"n{n}_i{images}"] = dict(spec=spec, err=float(np.abs(np.asarray(feats) - want).max()
                                                                / np.abs(want).max()),
                                          collectives=sum(hlo.count(op) for op in (" all-reduce", " all-gather",
                                                                                   " all-to-all", " reduce-scatter",
                                                                                   " collective-permute")))
    return out


def _collectives() -> dict:
    import collections
    import re

    import jax
    import jax.numpy as jnp

    from gemma3_jax.model import kv_cache as kvc
    from gemma3_jax.model.sharding import shard_cache, tensor_parallel

    def decode(m, tok, cache):
        h, cache = m.text.decode_step(m.text.embed_tokens(tok), cache)
        return m.text.logits(h), cache

    def prefill(m, ids):
        return m.text.logits(m.forward(ids)[0])

    model = _model(2)
    counts = {}
    for n in (2, 4):
        m = tensor_parallel(model, n)
        for b in (1, 4):
            cache = shard_cache(kvc.init_cache(m.cfg.text, b, 64, jnp.float32), m.kernels.mesh)
            for name, fn, args in (("decode", decode, (jnp.zeros((b, 1), jnp.int32), cache)),
                                   ("prefill", prefill, (jnp.ones((b, 24), jnp.int32),))):
                hlo = jax.jit(fn).lower(m, *args).compile().as_text()
                # the op where an instruction applies it (a combined collective's tuple shape holds spaces)
                ops = re.findall(r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                                 r"(?:-start)?\(", hlo)
                counts[f"{name}_n{n}_b{b}"] = dict(collections.Counter(ops))
    return dict(layers=model.cfg.text.num_layers, counts=counts)


def _generate() -> dict:
    import numpy as np

    from gemma3_jax.model.sharding import tensor_parallel
    from gemma3_jax.runtime.batching import BatchEngine, Request
    from gemma3_jax.runtime.engine import Engine

    model = _model(2)
    prompts = [_inputs(model.cfg, seed, tokens) for seed, tokens in ((1, 40), (2, 55), (3, 30))]

    def engine_tokens(m):
        eng, out = Engine(m, cache_length=128, chunk=8), []  # one engine: its compiled steps serve every prompt
        for ids, px in prompts:
            chunks = eng.generate_ids([list(ids[0])], px, max_new_tokens=20, stop_ids=())
            out.append(np.concatenate(list(chunks), axis=1)[0].tolist())
        return out

    def batch_tokens(m):
        eng = BatchEngine(m, max_batch=2, cache_length=128, chunk_tokens=16, step_tokens=8, decode_steps=4,
                          background_compile=True)
        assert eng.shapes.background == (m.kernels.shards == 1)  # shapes compiled ahead: on one device only
        streams = [eng.submit(Request(list(ids[0]), px, max_new_tokens=20, stop_ids=())) for ids, px in prompts]
        eng.run()
        return [s.tokens for s in streams]

    split = tensor_parallel(model, 4)
    alone = engine_tokens(model)
    return dict(engine=engine_tokens(split) == alone, batch=batch_tokens(split) == alone == batch_tokens(model))


def _errors() -> dict:
    from gemma3_jax.model.sharding import tensor_parallel

    out = {}
    model = _model(2)
    for name, n in (("heads", 3), ("devices", 16)):
        try:
            tensor_parallel(model, n)
        except ValueError as e:
            out[name] = str(e)
    try:
        tensor_parallel(_model(4, heads=12), 6)  # 6 divides the 12 query heads, not the 4 KV heads, nor 4 it
    except ValueError as e:
        out["kv"] = str(e)
    try:
        tensor_parallel(_model(2, quantize="int4"), 8)  # down's 128 inputs: 16 a device, half a group of 32
    except ValueError as e:
        out["groups"] = str(e)
    return out


def _loading(tmp: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from fixtures import real_layout as rl
    from gemma3_jax.checkpoints import loading
    from gemma3_jax.checkpoints.quantized import quantize_checkpoint
    from gemma3_jax.model import quant
    from gemma3_jax.model.config import CheckpointError
    from gemma3_jax.model.sharding import tensor_parallel

    path = rl.write_checkpoint(Path(tmp) / "it", "it")
    text_sizes = {int(np.prod(x.shape)) for k, x in rl.random_weights("it").items() if "language_model" in k
                  and x.ndim == 2}
    whole = []
    real_array, real_put = jnp.array, jax.device_put

    def spy(fn):
        def wrapped(x, *a, **k):
            if getattr(x, "ndim", 0) == 2 and int(np.prod(x.shape)) in text_sizes and tracing[0]:
                whole.append(list(x.shape))
            return fn(x, *a, **k)
        return wrapped

    tracing = [False]
    jnp.array, jax.device_put = spy(real_array), spy(real_put)  # what a whole-weight copy would go through
    mismatched, compared = [], 0
    try:
        stored = {m: quantize_checkpoint(path, Path(tmp) / m, m, progress=False) for m in ("int8", "int4")}
        for dtype, mode, source in ((jnp.bfloat16, None, path), (jnp.float32, None, path),
                                    (jnp.bfloat16, "int8", path), (jnp.float32, "fp8", path),
                                    (jnp.bfloat16, "int4", path),  # and checkpoints stored quantized:
                                    (jnp.bfloat16, None, stored["int8"]), (jnp.bfloat16, None, stored["int4"])):
            one = loading.load_pretrained(source, dtype, progress=False, quantize=mode)
            for n in (2, 4):
                want = nnx.state(tensor_parallel(one, n), nnx.Param)
                tracing[0] = True
                got = nnx.state(loading.load_pretrained(source, dtype, progress=False, tensor_parallel=n,
                                                        quantize=mode), nnx.Param)
                tracing[0] = False
                for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                          jax.tree_util.tree_flatten_with_path(want)[0]):
                    compared += 1
                    if a.dtype != b.dtype or a.sharding != b.sharding or not np.array_equal(np.asarray(a), np.asarray(b)):
                        mismatched.append(jax.tree_util.keystr(p))
    finally:
        jnp.array, jax.device_put = real_array, real_put
    # a NaN in one piece of a fused weight, the file rewritten
    shard = next(f for f in sorted(path.glob("*.safetensors"))
                 if any(k.endswith("layers.1.self_attn.k_proj.weight") for k in load_file(str(f))))
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.k_proj.weight"))
    bad = tensors[key].copy()
    bad.reshape(-1)[7] = np.nan
    tensors[key] = bad
    save_file(tensors, str(shard), metadata={"format": "pt"})
    nan = {}
    for mode in (None, *quant.MODES):  # quantized: the NaN reaches the row's or group's scale, which is checked
        try:
            loading.load_pretrained(path, progress=False, tensor_parallel=2, quantize=mode)
            nan[str(mode)] = "loaded"
        except CheckpointError as e:
            nan[str(mode)] = str(e)
    return dict(mismatched=mismatched, compared=compared, whole_text_arrays=whole, nan=nan)


def _distributed(pid: str, nproc: str, port: str, out: str) -> dict:
    """Logits of the model split over 4 devices, in one of ``nproc`` processes; saved whole by each."""
    import numpy as np

    from gemma3_jax.model.sharding import initialize_distributed, tensor_parallel

    if int(nproc) > 1:
        initialize_distributed(f"127.0.0.1:{port}", int(nproc), int(pid))
    import jax
    from jax.experimental import multihost_utils

    model = _model(2)
    ids, px = _inputs(model.cfg)
    logits = jax.jit(lambda m, ids, px: m.text.logits(m.forward(ids, px)[0]))(tensor_parallel(model, 4), ids, px)
    np.save(out, np.asarray(multihost_utils.process_allgather(logits, tiled=True)))
    return {"devices": jax.device_count(), "processes": jax.process_count()}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from gemma3_jax.runtime.compile_cache import enable_compilation_cache

    enable_compilation_cache()  # the run's shared cache (tests/conftest.py), inherited through the environment
    checks = {"logits": _logits, "generate": _generate, "errors": _errors, "distributed": _distributed,
              "loading": _loading, "vision": _vision, "collectives": _collectives}
    print(json.dumps(checks[sys.argv[1]](*sys.argv[2:])))
