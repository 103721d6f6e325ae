"""Bookkeeping: block pool (counting), block tables, sequences, the KV-cache manager and the scheduler; no tensors."""
