# Hallucinate: `make demo` and `make test` are the whole set-up on a fresh clone.
#
#   make extract DATASET=k400 VIDEO_ROOT=/data/k400/videos WORKERS=8
#   make extract DATASET=demo EXTRACTORS=audio.logmel OUT=features/demo
#   make extract DATASET=k400 SCHEDULER=tcp://10.0.0.5:8786
#   make extract DATASET=k400 CLUSTER=slurm ARGS="jobqueue.cores=8 jobqueue.memory=32GB"
#
#   make train DATASET=demo ARGS="loss=uncertainty epochs=40"
#   make evaluate DATASET=demo
#
# ARGS passes any further key=value to the hallucinate command
# (TRAIN_ARGS to the training step of `make demo`).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HALLUCINATE := $(BIN)/hallucinate
DATASET ?= demo
OPENCV := opencv-contrib-python-headless==5.0.0.93
# The last release whose wheel bundles the pose models (see shared/ENVIRONMENT.md);
# --no-deps because its metadata pulls jax and the non-headless OpenCV. Its
# runtime deps (absl-py, attrs, flatbuffers, protobuf<5) are in pyproject.toml.
MEDIAPIPE := mediapipe==0.10.14

# Only the variables that are set become key=value overrides.
EXTRACT_ARGS := dataset=$(DATASET) \
	$(if $(EXTRACTORS),extractors=$(EXTRACTORS)) \
	$(if $(OUT),out=$(OUT)) \
	$(if $(WORKERS),workers=$(WORKERS)) \
	$(if $(SCHEDULER),scheduler=$(SCHEDULER)) \
	$(if $(CLUSTER),cluster=$(CLUSTER)) \
	$(if $(VIDEO_ROOT),video_root=$(VIDEO_ROOT)) \
	$(if $(DATA_ROOT),data_root=$(DATA_ROOT)) \
	$(ARGS)

.PHONY: install install-mmpose demo extract train evaluate study inspect test bench lint clean

install: $(VENV)/.installed

# Other packages pull in plain opencv-python-headless, which shares the cv2
# folder; reinstalling the contrib build last keeps cv2.saliency/cv2.optflow.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps $(MEDIAPIPE)
	$(BIN)/pip install --force-reinstall --no-deps $(OPENCV)
	$(BIN)/python -c "import cv2; cv2.saliency; import torch, torchvision, av, h5py, distributed"
	$(BIN)/python -c "import mediapipe; mediapipe.solutions.pose"
	touch $@

# Optional: mmpose for backend.name=mmpose (top-down pose on detector boxes).
# mmcv 2.1.0 (mmdet 3.3 refuses 2.2) is compiled from its sdist with its ops,
# which mmpose imports. torch 2.14's headers need C++20, and mmcv's setup.py
# asks for C++14/17, so the flag is patched first. About 20-30 minutes on 2
# cores. --no-deps keeps the non-headless OpenCV and chumpy out; xtcocotools
# is built against our numpy. Never needed by the tests or the demo.
MMCV_BUILD ?= .wheels
install-mmpose: install
	$(BIN)/pip install "setuptools<81" wheel ninja cython
	rm -rf $(MMCV_BUILD)/mmcv-2.1.0 && mkdir -p $(MMCV_BUILD)
	$(BIN)/pip download --no-deps --no-binary :all: mmcv==2.1.0 -d $(MMCV_BUILD)
	tar xzf $(MMCV_BUILD)/mmcv-2.1.0.tar.gz -C $(MMCV_BUILD)
	sed -i "s/-std=c++1[47]/-std=c++20/g" $(MMCV_BUILD)/mmcv-2.1.0/setup.py
	cd $(MMCV_BUILD)/mmcv-2.1.0 && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 \
		$(CURDIR)/$(BIN)/pip wheel --no-build-isolation --no-deps . -w $(CURDIR)/$(MMCV_BUILD)
	$(BIN)/pip install --no-deps $(MMCV_BUILD)/mmcv-2.1.0-*.whl mmengine==0.10.7 mmdet==3.3.0 mmpose==1.3.2
	$(BIN)/pip install --no-deps addict yapf termcolor json_tricks munkres pycocotools shapely \
		terminaltables six tomli
	$(BIN)/pip install --no-build-isolation --no-binary xtcocotools --no-deps xtcocotools
	$(BIN)/pip install --force-reinstall --no-deps $(OPENCV)
	$(BIN)/python -c "from mmpose.apis import inference_topdown, init_model"

# alpha=0.05: on the demo's 180 training clips, hallucination steps of the
# shared backbone as large as its classification steps (the paper's alpha=1)
# cost accuracy (validation top-1 0.627 against 0.767, seed 0); the heads
# regress at the full rate whatever alpha is. loss=mse: the uncertainty loss
# was worse there (0.633). fusion=weighted_mean (Eqs. 21-22) down-weights the
# streams whose ground truth classifies poorly. 50 epochs because the RGB-only
# baseline is still improving at 30. See README, "Status". TRAIN_ARGS=...
# overrides any of them.
DEMO_TRAIN_ARGS ?= alpha=0.05 fusion=weighted_mean loss=mse epochs=50 lr_step=15

demo: install
	$(HALLUCINATE) extract dataset=demo $(ARGS)
	$(HALLUCINATE) inspect dataset=demo
	$(HALLUCINATE) train dataset=demo $(DEMO_TRAIN_ARGS) $(TRAIN_ARGS)
	$(HALLUCINATE) evaluate dataset=demo $(if $(TRAIN_ARGS),$(filter run=%,$(TRAIN_ARGS)))
	@echo "One seed shows the pipeline runs end to end; it cannot show whether hallucination helps:"
	@echo "seeds move top-1 by several points. \`make study\` trains 3 seeds x {baseline, hallucinated,"
	@echo "control, oracle} and reports paired differences with their spread (studies/demo/report.md)."

extract: install
	$(HALLUCINATE) extract $(EXTRACT_ARGS)

inspect: install
	$(HALLUCINATE) inspect dataset=$(DATASET) $(if $(OUT),out=$(OUT)) $(ARGS)

train: install
	$(HALLUCINATE) train dataset=$(DATASET) $(if $(OUT),features=$(OUT)) $(if $(RUN),run=$(RUN)) $(ARGS)

evaluate: install
	$(HALLUCINATE) evaluate dataset=$(DATASET) $(if $(OUT),features=$(OUT)) $(if $(RUN),run=$(RUN)) $(ARGS)

# Seeds x variants, each trained and evaluated, then report.md/json and plots in
# studies/<dataset>. On the demo, the runs use make demo's settings.
SEEDS ?= 0-2
VARIANTS ?= baseline,hallucinated,control,oracle
STUDY_TRAIN_ARGS ?= $(if $(filter demo,$(DATASET)),$(DEMO_TRAIN_ARGS))
study: install
	$(HALLUCINATE) study dataset=$(DATASET) seeds=$(SEEDS) variants=$(VARIANTS) \
		$(if $(OUT),features=$(OUT)) $(if $(DATA_ROOT),data_root=$(DATA_ROOT)) \
		$(if $(filter demo,$(DATASET)),readme=README.md) $(addprefix train.,$(STUDY_TRAIN_ARGS)) $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks.bench_demo
	$(BIN)/python -m benchmarks.bench_decode
	$(BIN)/python -m benchmarks.bench_clips
	$(BIN)/python -m benchmarks.bench_store
	$(BIN)/python -m benchmarks.bench_workers
	$(BIN)/python -m benchmarks.bench_training
	$(BIN)/python -m benchmarks.bench_detectors
	$(BIN)/python -m benchmarks.bench_saliency
	$(BIN)/python -m benchmarks.bench_motion
	$(BIN)/python -m benchmarks.bench_pose_audio
	$(BIN)/python -m benchmarks.bench_real

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf features runs studies .pytest_cache
