"""Triton kernels of pgdpo, installed as ``pgdpo.kernels`` (a top-level ``kernels`` would clash with
Hugging Face's ``kernels`` package, which diffusers imports).

``pgdpo.kernels.pgdpo_loss``: the fused PG-DPO loss, backend ``"triton"`` of ``pgdpo.pgdpo_loss``.
Submodules are not imported here: importing one reads ``TRITON_INTERPRET`` at that moment.
"""
