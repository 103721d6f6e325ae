"""Hot-path operations on the block pool: a PyTorch implementation (the CPU path and the test oracle)
beside a Triton kernel for CUDA tensors. Each public function here dispatches by device; set
``HF_PAGED_FORCE_TORCH=1`` to take the PyTorch path on a GPU too."""
