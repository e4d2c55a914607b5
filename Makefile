# Multi-task facial affect analysis: faces -> features -> train.
# Stage targets are files under runs/$(DATA)/, so `make train` builds what is missing first and a
# second call skips what is finished. ARGS="key=value ..." goes to the stage named on the command
# line (make faces ARGS="device=cuda" passes it to the faces stage only).

DATA      ?= sample
EXTRACTOR ?= onet
ENCODER   ?= gru
CONFIG    ?= configs/train.yaml
RUN       ?= $(if $(filter configs/train.yaml,$(CONFIG)),$(ENCODER),$(basename $(notdir $(CONFIG))))
ARGS      ?=
RUNS      ?= runs
PYTHON    ?= $(shell command -v python3.11 || command -v python3)
VENV      ?= .venv
PY        := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

SAMPLE_DONE   := data/sample/sample.yaml
FACES_DONE    := $(RUNS)/$(DATA)/faces/.done
FEATURES_DONE := $(RUNS)/$(DATA)/features/$(EXTRACTOR).h5
TRAIN_DONE    := $(RUNS)/$(DATA)/train/$(RUN)/scores.json
DATA_INPUTS   := $(if $(filter sample,$(DATA)),$(SAMPLE_DONE)) configs/data/$(DATA).yaml
args_for       = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))

.DEFAULT_GOAL := help
.PHONY: help setup test lint demo sample faces features train experiments evaluate predict bench bench-faces bench-features bench-pipeline bench-memory test-faults clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: DATA=$(DATA) EXTRACTOR=$(EXTRACTOR) ENCODER=$(ENCODER) CONFIG=$(CONFIG) RUN=$(RUN) ARGS=\"$(ARGS)\""

setup: $(VENV)/.installed ## create or refresh the virtual environment

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

lint: setup ## ruff over the project
	$(VENV)/bin/ruff check .

test: setup lint ## lint, then the whole test suite (one end-to-end run on a reduced sample included)
	$(VENV)/bin/pytest -q

test-faults: setup ## the fault-injection and bad-input suites alone (kills, locks, full disk, bad files)
	$(VENV)/bin/pytest -q tests/test_faults.py tests/test_bad_inputs.py tests/test_feature_kill.py

demo: setup $(TRAIN_DONE) ## the whole pipeline on the built-in sample; prints the validation scores
	$(PY) -m pipeline.evaluate data=$(DATA) predictions=$(RUNS)/$(DATA)/train/$(RUN)/predictions

sample: setup $(SAMPLE_DONE) ## write the built-in labelled sample to data/sample

$(SAMPLE_DONE): configs/sample.yaml pipeline/sample.py
	$(PY) -m pipeline.sample $(call args_for,sample)
	@touch $@

faces: setup $(FACES_DONE) ## stage 1: detect, track and align faces (runs/$(DATA)/faces/)

$(FACES_DONE): $(DATA_INPUTS) configs/faces.yaml
	$(PY) -m pipeline.faces data=$(DATA) out_dir=$(RUNS)/$(DATA)/faces $(call args_for,faces)
	@touch $@

features: setup $(FEATURES_DONE) ## stage 2: per-frame features (runs/$(DATA)/features/$(EXTRACTOR).h5)

$(FEATURES_DONE): $(FACES_DONE) configs/features.yaml $(wildcard configs/features/$(EXTRACTOR).yaml)
	$(PY) -m pipeline.features data=$(DATA) extractor=$(EXTRACTOR) faces_dir=$(RUNS)/$(DATA)/faces \
		out_dir=$(RUNS)/$(DATA)/features $(call args_for,features)

train: setup $(TRAIN_DONE) ## stage 3: train and score an encoder (runs/$(DATA)/train/$(RUN)/)

# An experiment config names its own encoder and extractors; the variables apply to train.yaml.
DEFAULT_CONFIG := $(filter configs/train.yaml,$(CONFIG))
TRAIN_CHOICES   = $(if $(DEFAULT_CONFIG),extractors=[$(EXTRACTOR)] encoder=$(ENCODER))

$(TRAIN_DONE): $(FEATURES_DONE) $(CONFIG) $(if $(DEFAULT_CONFIG),configs/encoders/$(ENCODER).yaml)
	$(PY) -m pipeline.train $(CONFIG) data=$(DATA) $(TRAIN_CHOICES) \
		runs_dir=$(RUNS) out_dir=$(RUNS)/$(DATA)/train/$(RUN) $(call args_for,train)

EXPERIMENTS ?= mtl_gru mtl_lstm mtl_transformer va_only expr_only au_only
experiments: setup $(FEATURES_DONE) ## train configs/experiments/*.yaml named in EXPERIMENTS, one run folder each
	@for x in $(EXPERIMENTS); do $(MAKE) --no-print-directory train CONFIG=configs/experiments/$$x.yaml || exit 1; done

evaluate: setup ## score a predictions folder: make evaluate PRED=folder [DATA=...]
	$(PY) -m pipeline.evaluate data=$(DATA) predictions=$(or $(PRED),$(RUNS)/$(DATA)/train/$(RUN)/predictions) $(ARGS)

predict: setup ## one new video through all stages: make predict VIDEO=clip.mp4 CHECKPOINT=runs/.../best.pt
	@test -n "$(VIDEO)" || { echo "set VIDEO=path/to/video.mp4"; exit 2; }
	$(PY) -m pipeline.predict video=$(VIDEO) checkpoint=$(or $(CHECKPOINT),$(RUNS)/$(DATA)/train/$(RUN)/best.pt) $(ARGS)

bench: setup $(FEATURES_DONE) ## encoders side by side: parameters, throughput, memory, validation P_MTL
	$(PY) -m pipeline.bench data=$(DATA) extractors=[$(EXTRACTOR)] runs_dir=$(RUNS) $(ARGS)

bench-faces: setup ## faces stage against the plain facenet-pytorch loop, and peak memory on a long video
	$(PY) -m pipeline.bench_faces $(ARGS)

bench-features: setup ## features stage against the bare model forward, and cache window reads
	$(PY) -m pipeline.bench_features $(ARGS)

bench-pipeline: setup ## where the time goes in the whole pipeline, and the projected Aff-Wild2 time
	$(PY) -m pipeline.bench_pipeline $(ARGS)

bench-memory: setup ## peak memory of faces and features on a 1- and a 30-minute 720p video, against 1.5 GB
	$(PY) -m pipeline.bench_memory $(ARGS)

clean: ## remove runs/ and the generated sample (keeps the virtual environment)
	rm -rf $(RUNS) data/sample
