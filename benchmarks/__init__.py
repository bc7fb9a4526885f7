"""Benchmarks and GPU checks of gemma3-jax, one module a command; run each from the repository root as a module:

    python -m benchmarks.attention --checks      # the attention kernel against its peers
    python -m benchmarks.generate                # Engine prefill/decode against transformers
    python -m benchmarks.gemv                    # decode matrix-vector products
    python -m benchmarks.profile_generate        # where a prefill and a decode step spend their time
    python -m benchmarks.trace_prefill           # a prefill's GPU kernel time by kind
    python -m benchmarks.check_gpu_numerics      # the compiled kernels against transformers on a GPU

``--help`` lists each one's flags; ``--small`` (generate, profile_generate, trace_prefill) or ``--quick`` (gemv) is
the CPU check of its code paths. ``common`` holds what they share (timing, error recording, prompts, JSON output),
``random_init`` the random-weight models they time. Nothing here ships with the package.
"""
