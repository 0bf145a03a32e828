"""Study tools: report, compare, tune (Optuna), explain (Grad-CAM)."""
