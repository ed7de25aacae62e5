"""archlab models: one nnx.Module per architecture, sizes in conf/model/*.yaml."""

from flax import nnx

# Parameters carry logical axis names; train/mesh.py turns them into shardings and the
# jitted init places them. Variables must not try to shard themselves at creation.
nnx.use_eager_sharding(False)
