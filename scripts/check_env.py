"""Sanity check of a freshly built environment: a CPU (or CUDA) torch, and none of the packages that break it.

Run by scripts/setup_env.sh; exits non-zero with a message naming the problem. Arguments name the banned
packages an environment needs all the same (Axolotl's imports triton).
"""
import importlib.util
import sys

import torch

# The only torchvision wheel reachable on the CPU machines is a CUDA build: next to a CPU torch it fails
# with "operator torchvision::nms does not exist" and breaks transformers' Trainer and Unsloth on import.
# triton and xformers are CUDA-only and make TRL pick a Triton code path that crashes on CPU.
BANNED = ("torchvision", "triton", "xformers")


def main(allowed: list[str]) -> int:
    banned = [name for name in BANNED if name not in allowed]
    problems = [f"{name} is installed; remove it (pip uninstall -y {name})"
                for name in banned if importlib.util.find_spec(name) is not None]
    if not (torch.__version__.endswith("+cpu") or torch.cuda.is_available()):
        problems.append(f"torch {torch.__version__} is a CUDA build on a machine without CUDA")
    for problem in problems:
        print(f"[setup] environment problem: {problem}", file=sys.stderr)
    if not problems:
        print(f"[setup] torch {torch.__version__}; none of {', '.join(banned)} installed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
