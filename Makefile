# The two commands of the README. Each builds (or reuses) the pinned environments first: the main one, and the
# tools' own: Axolotl's (Part 3 runs its CLI from there) and vLLM's (Part 5 runs its server from there).
#   make run    set up, then run the series' main job on the embedded default (results/REPORT.md)
#   make test   set up, then run every test: unit tests of scripts/ and all notebooks through nbval
# Pass options through ARGS, e.g.  make run ARGS="--only 00b"   or   make test ARGS="-k validation".
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: run test env

env:
	@scripts/setup_env.sh main >/dev/null
	@scripts/setup_env.sh axolotl >/dev/null
	@scripts/setup_env.sh vllm >/dev/null

run:
	@scripts/setup_env.sh axolotl >/dev/null; scripts/setup_env.sh vllm >/dev/null; env_dir=$$(scripts/setup_env.sh main); "$$env_dir/bin/python" scripts/run_series.py $(ARGS)

test:
	@scripts/setup_env.sh axolotl >/dev/null; scripts/setup_env.sh vllm >/dev/null; env_dir=$$(scripts/setup_env.sh main); start=$$SECONDS; \
	"$$env_dir/bin/python" -m pytest $(ARGS); \
	echo "[test] whole test command: $$((SECONDS - start)) s after setup"
