"""zckpt: sharded (ZeRO-style) training checkpoints without pickle."""
