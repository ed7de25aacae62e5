"""Train one composed config in this process and print the losses and per-device parameter shard shapes as JSON.

Run in a subprocess by tests that need a device count set through XLA_FLAGS before JAX starts.
"""

import json
import sys
import tempfile

import jax

from train.config import compose
from train.loop import setup, train
from train.writers import read_metrics

if __name__ == "__main__":
    run_dir = tempfile.mkdtemp()
    exp = setup(compose(sys.argv[1:]), run_dir)
    train(exp)
    flat = jax.tree_util.tree_flatten_with_path(exp.final_state["params"])[0]
    shards = {jax.tree_util.keystr(path): [list(x.shape), list(x.addressable_shards[0].data.shape)]
              for path, x in flat}
    losses = [r["train/loss"] for r in read_metrics(exp.run_dir / "metrics.jsonl") if "train/loss" in r]
    print(json.dumps({"devices": jax.device_count(), "mesh": dict(exp.mesh.shape), "losses": losses,
                      "shards": shards}))
