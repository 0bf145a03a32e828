"""How a trained model runs: the run folder and checkpoint description, the torch and onnxruntime backends
(both return logits), the one function from logits to the answer (`answer`), calibration, predict, evaluate,
pseudo-labels, the submission files."""
