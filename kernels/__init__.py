"""Attention kernels for cello. Each op has a Triton kernel and a PyTorch reference with the same signature.

Dispatch (the `backend` argument of both ops):
  "auto"   - CUDA tensors run the Triton kernel, CPU tensors the PyTorch reference (SDPA). Even with
             TRITON_INTERPRET=1, "auto" on CPU picks the reference: the interpreter is for tests only.
  "triton" - force the kernel (on CPU only under TRITON_INTERPRET=1, set before triton is imported).
  "torch"  - force the reference.

prefill_attention(q, k, v, seq_lens, scale=None, backend="auto")
    causal GQA over right-padded rows
decode_attention(q, k_prompt, v_prompt, prompt_lens, groups, k_gen, v_gen, slots, gen_lens, scale=None, backend="auto")
    one new token per row vs its prompt group's shared prompt K/V followed by its own generated K/V
"""
from .decode_attention import decode_attention, decode_attention_ref
from .prefill_attention import prefill_attention, prefill_attention_ref

__all__ = ["prefill_attention", "decode_attention", "prefill_attention_ref", "decode_attention_ref"]
