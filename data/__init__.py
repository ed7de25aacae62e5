"""archlab datasets: one module per source kind, each yielding dicts of numpy arrays.

Every dataset gives `train_batch(step, batch_size, shard)`, a pure function of (seed, step) so that a resumed
run sees exactly the batches an uninterrupted one would, and `eval_batches(batch_size, shard)` over the fixed
evaluation split, padded to full batches with `mask` = 0 on the padding rows.
"""
