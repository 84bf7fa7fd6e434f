"""The run machinery of train.py: checkpoints, Muon, the weights' average, experiment trackers."""
