# The entry points: `make demo` runs the product, `make test` runs the whole suite (both set up first).
.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check .

bench: setup
	HF_HUB_OFFLINE=1 .venv/bin/python bench/auth_overhead.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/engine.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/hostile.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/usage.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/collections.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py
	HF_HUB_OFFLINE=1 .venv/bin/python bench/replicas.py

clean:
	rm -rf .venv .node var .pytest_cache
