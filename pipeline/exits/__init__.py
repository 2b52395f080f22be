"""Early exits: heads, confidence metrics, their separation, calibration of ε, training."""
