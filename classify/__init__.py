"""maskcls's classifier: training, inference, study and deployment (one subpackage each), and the library API.

    import classify
    model = classify.load("runs/b4")           # checkpoint, run folder, k-fold run or .onnx
    answers = model.predict(["a.jpg", rgb_array])
    classify.train("crops", "runs/r", epochs=6)

`import classify` is cheap: `load` and `train` import the machinery they need on first use (api.py), and an
.onnx model loads without torch.
"""
__all__ = ["load", "train", "prior_of", "Model", "PhotoAnswer"]


def __getattr__(name: str):
    if name in __all__:
        from classify import api
        return getattr(api, name)
    raise AttributeError(f"module 'classify' has no attribute {name!r}")
