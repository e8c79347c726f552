# The two commands of the README:
#   make demo   set up, then run the whole pipeline on the tiny CPU default
#   make test   set up, then run the test suite
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: setup demo test lint dryrun docs clean

setup: $(STAMP) /usr/bin/ffmpeg

# Reinstall only when the project's requirements change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

/usr/bin/ffmpeg:
	command -v ffmpeg >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg)

# The report test opens the HTML report in a headless browser, driven by selenium.
/usr/bin/chromedriver:
	command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --profile profiles/local --cores $(CORES)
	@echo "samples: results/samples/ (one mp4 per prompt and stage); checkpoints: results/checkpoints/"

test: setup /usr/bin/chromedriver
	PATH=$(abspath $(VENV))/bin:$$PATH pytest -q

lint: setup
	$(VENV)/bin/snakemake --lint

dryrun: setup
	$(VENV)/bin/snakemake -n

# The README's config reference (from the schema) and the DAG picture (needs graphviz).
docs: setup
	$(PY) -m soraflow.workflow.docs README.md
	$(VENV)/bin/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg

clean:
	rm -rf data models results logs .snakemake
