"""The ExCB method itself: cluster balancing, the loss, the training step, k-means init, schedules, statistics."""
