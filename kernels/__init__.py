"""Sparse attention kernels of the prefill stage (``mmsparse.kernels``).

Pure tensors in, tensors out; nothing here knows about models. One index format
(``index.SparseIndex``, read in a ``index.TokenOrder``) that every pattern compiles to:

* ``index``            -- the format, token orders (causality on original positions), mask -> index;
* ``patterns``         -- builders: A-shape, vertical-slash, block top-k / cumulative mass;
* ``permute``          -- the video grid made dense by a position-major permutation;
* ``pointwise``        -- fused RMSNorm and SwiGLU product for the rest of a long prefill;
* ``sparse_attention`` -- the Triton kernel (GQA inside, LSE output, varlen by padding);
* ``flex``             -- the same index through torch FlexAttention;
* ``reference``        -- plain PyTorch references of the same semantics.

Modules are imported on use (triton is not loaded by ``import mmsparse``).
"""
