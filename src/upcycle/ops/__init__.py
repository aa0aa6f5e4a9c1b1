"""Kernels and numerics, each fast path beside a plain reference that states its semantics as a loop.

Reading order:
- `batched_lora` / `reference_lora`       multi-adapter LoRA for mixed batches (serving)
- `grouped_experts` / `reference_moe`     grouped SwiGLU expert matmul (the MoE's dispatchers)
- `sparse_ffn` / `reference_ffn`          a SwiGLU FFN that computes only the neurons a token uses (mask experts)
- `kmeans`                                balanced k-means, heap assignment beside its loop reference
- `flops`                                 matmul FLOP counts of dense and sparse decoders
"""
