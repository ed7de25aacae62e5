"""archlab training: `python -m train` composes the Hydra config and runs `train.loop.run`."""
