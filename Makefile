# r1cpu developer targets. Everything runs inside ./.venv, created on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: compare install install-reference install-interop test test-fast test-reference test-interop demo bench-checkpoint fuzz train-tiny-r1 clean

# Create ./.venv and install r1cpu in editable mode with its test extras.
install: $(STAMP)
$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# torch (CPU) + transformers: the live logits oracle (large download).
install-reference: install
	$(PY) -m pip install -q -e '.[test,reference]'

# llama-cpp-python, built from source (about 8 minutes on 2 cores).
install-interop: install
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PY) -m pip install -q -e '.[test,interop]'

# The default suite: no torch, transformers or llama.cpp needed.
test: install
	$(PY) -m pytest -q

# Skip the slow tests.
test-fast: install
	$(PY) -m pytest -q -m 'not slow and not reference and not interop'

# Re-run the transformers comparisons live (regenerates reference logits and compares).
test-reference: install-reference
	$(PY) -m pytest -q -m reference

# llama.cpp loads our files and agrees with the reference; its converter's output is compared too
# (its source comes from the llama-cpp-python source distribution, into .cache/llama.cpp).
test-interop: install-interop install-reference .cache/llama.cpp
	$(PY) -m pytest -q -m interop

.cache/llama.cpp:
	mkdir -p .cache/sdist
	$(PY) -m pip download -q --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d .cache/sdist
	tar xzf .cache/sdist/llama_cpp_python-0.3.36.tar.gz -C .cache/sdist
	mv .cache/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp .cache/llama.cpp

# `r1cpu chat` on the embedded default model (built under out/demo on first use); without a
# terminal (CI) it pipes one question through the chat.
demo: install
	$(PY) -m r1cpu.tools.demo

# Retrain the embedded tiny R1 into tools/data/tiny-r1 (about an hour on one CPU thread; torch +
# transformers), convert it to the shipped Q8_0 file and score it on the held-out tasks.
train-tiny-r1: install
	$(PY) -m pip install -q -e '.[test,train]'
	$(PY) -m r1cpu.tools.train_tiny_r1 --threads 1
	.venv/bin/r1cpu convert tools/data/tiny-r1 -o runtime/data/tiny-r1.q8_0.gguf --type q8_0 --force
	.venv/bin/r1cpu eval-tasks runtime/data/tiny-r1.q8_0.gguf --n 50

# The 6-layer Moonlight-shaped checkpoint for speed work (about 6.6 GB, outside the repo).
bench-checkpoint: install
	$(PY) -m r1cpu.tools.make_checkpoint bench ../bench-ckpt --layers 6

# Mutation fuzzing of GGUF reading, loading and a 2-token forward (tools/fuzz_gguf.py): FUZZ_CASES
# files, one worker process at a time, niced; report and findings (the files) go to out/fuzz.
FUZZ_CASES ?= 100000
fuzz: install
	nice -n 10 $(PY) -m r1cpu.tools.fuzz_gguf --cases $(FUZZ_CASES) --out out/fuzz

# Size / bits per weight / PPL / KLD / same-top-p / tg table and PNG of the quant types on tiny-v3 (random weights).
compare: install
	test -d out/tiny-v3 || $(PY) -m r1cpu.tools.make_checkpoint tiny-v3 out/tiny-v3
	.venv/bin/r1cpu compare out/tiny-v3 --file tools/data/eval-text.txt -o out/tiny-v3-compare

clean:
	rm -rf out .pytest_cache
