"""Everything that exists to decode: segment prefill and sampling (``generate``), static caches replayed as CUDA
graphs (``static_decode``) and blocks' decoding steps in fused Triton kernels (``fused_step``). It drives the
model's blocks; the model does not call it."""
