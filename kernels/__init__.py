"""Triton attention kernels of the prefill stage (``mmsparse.kernels``).

Pure tensors in, tensors out; nothing here knows about models. The sparse kernels are the
subject of their own issue and are not in this version: the prefill stage is refused by
``mmsparse.config.resolve_sparse`` until they land.
"""
