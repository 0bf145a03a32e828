"""Training: `train.fit(TrainConfig)`, one epoch, k-fold, the config, losses, schedule, batch mixing, logs, torch.distributed."""
