# The two commands of the README. Each builds (or reuses) the pinned environments first: the main one, and the
# tools' own: Axolotl's (Part 3 runs its CLI from there) and vLLM's (Part 5 runs its server from there).
#   make run    set up, then run the series' main job on the embedded default (results/REPORT.md)
#   make test   set up, then run every test: unit tests of scripts/ and all notebooks through nbval
#   make outputs  run notebooks (e.g. ARGS="--only 07"), then copy their outputs into them, ready to commit
# Pass options through ARGS, e.g.  make run ARGS="--only 00b"   or   make test ARGS="-k validation".
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: run test env outputs

# The three environments build side by side: each is its own folder, and on a cold machine the tools' downloads
# overlap the main environment's llama-cpp-python compile (the longest step). `wait` fails the target with
# the first build that failed.
SETUP = scripts/setup_env.sh axolotl >/dev/null & axolotl=$$!; scripts/setup_env.sh vllm >/dev/null & vllm=$$!; \
	env_dir=$$(scripts/setup_env.sh main); wait $$axolotl; wait $$vllm; $(TCMALLOC)

# tcmalloc where the machine has it (Debian's libtcmalloc-minimal4; setup_env.sh installs it when it can): the
# default allocator returns the large per-step buffers (logits, activations) to the kernel and faults them in again
# at every step. Seen on a 2-core AMD EPYC: kernel time in a 45 s LoRA SFT run fell from ~7 s to ~2.5 s, same losses.
TCMALLOC = tc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; \
	if [ -f $$tc ]; then export LD_PRELOAD=$$tc TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776; fi

env:
	@$(SETUP)

run:
	@$(SETUP); "$$env_dir/bin/python" scripts/run_series.py $(ARGS)

outputs:
	@$(SETUP); "$$env_dir/bin/python" scripts/run_series.py $(ARGS); "$$env_dir/bin/python" scripts/notebook_outputs.py adopt

test:
	@$(SETUP); start=$$SECONDS; \
	"$$env_dir/bin/python" -m pytest $(ARGS); \
	echo "[test] whole test command: $$((SECONDS - start)) s after setup"
