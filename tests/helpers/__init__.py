"""Helpers shared by tests and the processes tests start."""


def nan_at_call(make_loss, call: int, when=lambda: True):
    """A stand-in for `classify.training.train.make_loss` whose losses turn NaN at the `call`-th loss
    evaluation (counted over every head's loss function of the process), if `when()` holds."""
    calls = {"n": 0}

    def poisoned(*a, **k):
        fn = make_loss(*a, **k)

        def loss(logits, y):
            calls["n"] += 1
            out = fn(logits, y)
            return out * float("nan") if calls["n"] == call and when() else out
        return loss
    return poisoned
