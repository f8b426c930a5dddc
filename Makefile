# make run   - run the notebook series on the embedded default into outputs/ (creates .venv if missing)
# make test  - unit tests, then every notebook under nbval with small parameters, then checks on their summaries
# make sweep - the max_steps sweep of notebook 04
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is whatever build your pip index serves (PyPI's Linux wheel is a CUDA build); set TORCH_SPEC for another.
# TORCH_SPEC is split into pip arguments on purpose (unquoted below), so it may carry options such as
# --index-url for another CUDA version.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test sweep setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# .gitattributes sends notebooks through nbstripout on commit: outputs of interactive runs never get committed
	! git rev-parse --git-dir >/dev/null 2>&1 || { git config filter.nbstripout.clean "'$(abspath $(PY))' -m nbstripout --keep-id" && git config filter.nbstripout.smudge cat; }
	$(PY) -c "from helpers.models import embedded_model_path; print(embedded_model_path())"
	touch $@

run: setup
	$(PY) -m helpers.notebooks run

test: setup
	$(PY) -m pytest
	rm -rf outputs/nbval  # notebook tests start from nothing (03 would resume an older run there)
	$(PY) -m helpers.notebooks prepare --params tests/notebook_params.json --into outputs/nbval
	$(PY) -m pytest --nbval-lax --nbval-cell-timeout=1200 -p no:cacheprovider outputs/nbval tests/notebook_checks

sweep: setup
	$(PY) -m helpers.notebooks sweep

clean:
	rm -rf outputs
