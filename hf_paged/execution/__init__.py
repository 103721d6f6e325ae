"""Execution: the plan, kernels, model patches, KV tensors, the model runner, the sampler and CUDA graphs."""
