"""Backends of the fused operators, below the loss layer (aft_fast/losses/), which they never import.

backend         the contract: the `Backend`, `ChunkPrims` and `GroupObjective` protocols, `AFTResult`
dispatch        backend choice (`resolve_backend`) and lookup (`get_backend`), in one place
chunk_loop      the chunk loop shared by the chunked backends, its CPU engine, `ChunkedBackend`
torch_chunks    chunk primitives in plain PyTorch (the `torch` backend)
cpp_chunks      the same primitives as C++ ops (csrc/, the `cpp` backend)
triton_chunks   the triton backend's chunk engine (cuBLAS products, Triton row kernels)
triton_backend  the `triton` backend: host code of the Triton kernels, its two strategies
"""
