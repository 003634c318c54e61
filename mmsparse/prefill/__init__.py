"""The prefill stage: per-head sparse attention chosen from the input (MMInference-style).

``attention``  -- the function registered with transformers, request state, stats;
``selection``  -- per-head pattern choice (A-shape, vertical-slash, block, permuted grid, dense).
"""
