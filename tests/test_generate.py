"""generate / chat: greedy equals a hand-written argmax loop, batching changes nothing, seeds repeat."""

import io
import json

import pytest
import torch
from helpers import make_tokenizer, save_model_folder, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, inject_adapter, save_adapter
from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.generate import chat_loop, generate, read_prompts, render_prompt, stop_token_ids

PROMPTS = ["The quick brown fox", "Low-rank", "Translate to French: hello world ->", "abc"]


@pytest.fixture(scope="module")
def model_tok():
    return tiny_llama(), make_tokenizer()


def _argmax_loop(model, tokenizer, ids, n, stops):
    """Reference: no KV cache, no padding, one full forward per new token."""
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            ids.append(token)
            new.append(token)
    return new


def test_greedy_matches_reference_and_batching(model_tok):
    model, tok = model_tok
    one = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=1)
    batched = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)  # padded batches of 3 and 1
    assert batched == one
    stops = stop_token_ids(tok, model)
    for prompt, text in zip(PROMPTS, one):
        new = _argmax_loop(model, tok, render_prompt(tok, prompt, chat=False), 10, stops)
        assert text == tok.decode(new, skip_special_tokens=True)
    assert sum(len(t) for t in one) > 0


def test_chat_prompts_batched(model_tok):
    model, tok = model_tok
    convs = ["What is two plus two?", [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]]
    one = generate(model, tok, convs, chat=True, max_new_tokens=6, batch_size=1)
    assert generate(model, tok, convs, chat=True, max_new_tokens=6, batch_size=2) == one
    ids = render_prompt(tok, convs[0], chat=True)
    assert ids == tok.apply_chat_template([{"role": "user", "content": convs[0]}], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert one[0] == tok.decode(_argmax_loop(model, tok, ids, 6, stop_token_ids(tok, model)), skip_special_tokens=True)


def test_sampling_is_seeded(model_tok):
    model, tok = model_tok
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, batch_size=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    a = generate(model, tok, PROMPTS, seed=1, **kw)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG is untouched
    assert generate(model, tok, PROMPTS, seed=1, **kw) == a
    assert generate(model, tok, PROMPTS, seed=2, **kw) != a
    assert a != generate(model, tok, PROMPTS, max_new_tokens=12)  # really sampling


def test_generation_stops_at_eos(model_tok):
    model, tok = model_tok
    ids = render_prompt(tok, "hello", chat=False)
    greedy = _argmax_loop(model, tok, ids, 8, stop_token_ids(tok, model))
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    stopping = make_tokenizer()
    stopping.eos_token = tok.convert_ids_to_tokens(greedy[k])  # the k-th greedy token now ends the text
    got = generate(model, stopping, ["hello"], max_new_tokens=8)
    assert got == [tok.decode(greedy[:k], skip_special_tokens=True)]


def test_a_position_table_bounds_the_generation(capsys):
    # GPT-2 has a row per position up to n_positions: generation stops there instead of failing
    model, tok = tiny_gpt2(n_positions=24), make_tokenizer()
    ids = render_prompt(tok, PROMPTS[0], chat=False)
    room = 24 - len(ids)
    assert 0 < room < 100
    got = generate(model, tok, [PROMPTS[0]], max_new_tokens=100)
    assert got == generate(model, tok, [PROMPTS[0]], max_new_tokens=room)
    assert got == [tok.decode(_argmax_loop(model, tok, ids, room, stop_token_ids(tok, model)), skip_special_tokens=True)]
    # in a batch, each prompt runs to its own end of the table, not the longest one's
    short = "2 plus 3 is"
    alone = generate(model, tok, [short], max_new_tokens=100)
    assert generate(model, tok, [PROMPTS[0], short], max_new_tokens=100) == got + alone
    assert len(tok(alone[0])["input_ids"]) > room  # (the short one has more room than the long one)
    long = len(render_prompt(tok, PROMPTS[0] * 3, chat=False))
    with pytest.raises(UserError, match=f"^the prompt is {long} tokens and fills all 24 positions"):
        generate(model, tok, [PROMPTS[0] * 3], max_new_tokens=5)
    with pytest.raises(UserError, match=f"^prompt 2 is {long} tokens and fills all 24 positions"):
        generate(model, tok, [short, PROMPTS[0] * 3], max_new_tokens=5)
    with pytest.raises(UserError, match=f"^p.jsonl:7: the prompt is {long} tokens and fills all 24 positions"):
        generate(model, tok, [short, PROMPTS[0] * 3], max_new_tokens=5, places=["p.jsonl:3", "p.jsonl:7"])
    out = io.StringIO()  # in a chat, a conversation that outgrew the table is refused and the session goes on
    history = chat_loop(model, tok, stdin=io.StringIO(PROMPTS[0] * 3 + "\nhi\n"), stdout=out, max_new_tokens=3)
    reply = generate(model, tok, [[{"role": "user", "content": "hi"}]], chat=True, max_new_tokens=3)[0]
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    said = capsys.readouterr().err  # notes on stderr; stdout holds the replies alone
    assert "fills all 24 positions" in said and "/reset" in said and out.getvalue() == reply + "\n"


def test_chat_loop_history_reset_exit(model_tok, capsys):
    model, tok = model_tok
    out = io.StringIO()
    stdin = io.StringIO("hi\nand then?\n/reset\nhello\n/exit\nnever read\n")
    history = chat_loop(model, tok, system="Be brief.", stdin=stdin, stdout=out, max_new_tokens=6)
    sys_msg = {"role": "system", "content": "Be brief."}
    r1 = generate(model, tok, [[sys_msg, {"role": "user", "content": "hi"}]], chat=True, max_new_tokens=6)[0]
    turn2 = [sys_msg, {"role": "user", "content": "hi"}, {"role": "assistant", "content": r1},
             {"role": "user", "content": "and then?"}]  # fmt: skip
    r2 = generate(model, tok, [turn2], chat=True, max_new_tokens=6)[0]
    r3 = generate(model, tok, [[sys_msg, {"role": "user", "content": "hello"}]], chat=True, max_new_tokens=6)[0]
    assert history == [sys_msg, {"role": "user", "content": "hello"}, {"role": "assistant", "content": r3}]
    # streamed text: each reply on its own line; the reset notice on stderr
    assert out.getvalue().split("\n") == [r1, r2, r3, ""]
    assert capsys.readouterr().err.splitlines()[1:] == ["(conversation cleared)"]


def test_cli_generate_and_chat(tmp_path, capsys, monkeypatch):
    model = tiny_llama()
    folder = save_model_folder(tmp_path / "m", model, make_tokenizer())
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    save_adapter(model, tmp_path / "a")
    want = generate(model, make_tokenizer(), PROMPTS[:2], max_new_tokens=5)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    args = ["generate", "--model", str(folder), "--adapter", str(tmp_path / "a"), "--max-new-tokens", "5"]
    assert main(args + ["--prompts", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"prompt": p, "completion": w} for p, w in zip(PROMPTS[:2], want)]
    assert main(args + ["--prompt", PROMPTS[0]]) == 0
    assert capsys.readouterr().out == want[0] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "4"]) == 0
    r = generate(tiny_llama(), make_tokenizer(), ["hi"], chat=True, max_new_tokens=4)[0]
    assert capsys.readouterr().out == r + "\n"


def test_bad_inputs(tmp_path, capsys):
    folder = save_model_folder(tmp_path / "m", tiny_llama(), make_tokenizer(template=None))
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--chat"]) == 2
    assert "chat template" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": 1}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "both.jsonl").write_text('{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(UserError, match=r'both.jsonl:1: the line has both "prompt" and "messages"; give one of them'):
        read_prompts(tmp_path / "both.jsonl")
    (tmp_path / "plain.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "plain.txt") == ["one", "two"]
    # - (standard input) and a pipe, which are no regular files
    import subprocess
    import sys

    code = "import sys; from lorakit.generate import read_prompts; print(read_prompts(sys.argv[1]))"
    for source in ("-", "/dev/stdin"):
        piped = subprocess.run([sys.executable, "-c", code, source], input='{"prompt": "one"}\n', capture_output=True, text=True)
        assert piped.stdout == "['one']\n", piped.stderr
    with pytest.raises(UserError, match=r"is a folder; give a text file .* or - for standard input"):
        read_prompts(tmp_path)
    with pytest.raises(UserError, match=r"file not found; give a text file .* or - for standard input"):
        read_prompts(tmp_path / "none.txt")
    # a .txt file is text whatever its first line; elsewhere a first prompt that starts with { is JSONL, and says so
    (tmp_path / "curly.txt").write_text("{name} is a placeholder\nplain\n")
    assert read_prompts(tmp_path / "curly.txt") == ["{name} is a placeholder", "plain"]
    (tmp_path / "curly").write_text("\n{name} is a placeholder\n")
    with pytest.raises(UserError, match=r"curly:2: invalid JSON: .* \(read as JSONL: its first prompt starts with '\{'; "
                                        r"a \.txt file is read as text\)"):  # fmt: skip
        read_prompts(tmp_path / "curly")
    piped = subprocess.run([sys.executable, "-c", code, "-"], input='{"prompt": 1}\n', capture_output=True, text=True)
    assert piped.stderr.strip().endswith("<stdin>:1: expected an object with a \"prompt\" string or a \"messages\" list")
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "one"}\r\n')  # saved by a Windows editor
    assert read_prompts(tmp_path / "bom.jsonl") == ["one"]
    (tmp_path / "latin1.txt").write_bytes("one\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt:2: not UTF-8 text \(invalid continuation byte\); save the file as UTF-8"):
        read_prompts(tmp_path / "latin1.txt")


def test_arguments_and_chat_lines_with_bytes_that_are_not_utf8(model_tok, capsys):
    # Python hands such bytes over as lone surrogates (surrogateescape); no tokenizer encodes those
    model, tok = model_tok
    assert main(["generate", "--model", "no/such/model", "--prompt", "caf\udce9"]) == 2  # refused before loading
    assert capsys.readouterr().err == "error: --prompt: byte 0xe9 at character 4 is not UTF-8 text; pass UTF-8 text " \
                                      "(set the terminal's encoding to UTF-8)\n"  # fmt: skip
    assert main(["chat", "--model", "no/such/model", "--system", "\udcff"]) == 2
    assert "error: --system: byte 0xff at character 1 is not UTF-8 text" in capsys.readouterr().err
    out = io.StringIO()  # in a chat the line is refused and the session goes on
    history = chat_loop(model, tok, stdin=io.StringIO("caf\udce9\nhi\n"), stdout=out, max_new_tokens=3)
    reply = generate(model, tok, [[{"role": "user", "content": "hi"}]], chat=True, max_new_tokens=3)[0]
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    assert "(that line's byte 0xe9 at character 4 is not UTF-8 text; type it again in UTF-8)\n" in capsys.readouterr().err
    assert out.getvalue() == reply + "\n"


def test_model_and_adapter_folders_whose_paths_are_not_utf8_exit_2(tmp_path, capsys):
    # the tokenizers and safetensors libraries cannot open such paths (a traceback from the tokenizer)
    model, adapter = tmp_path / "m\udcff", tmp_path / "a\udcff"
    model.mkdir()
    adapter.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    for args, what, path in (
        (["generate", "--model", str(model), "--prompt", "hi"], "model", model),
        (["eval", "--model", str(model), "--data", str(data)], "model", model),
        (["inspect", str(adapter)], "adapter", adapter),
        (["merge", "--base", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "o")], "adapter", adapter),
    ):
        assert main(args) == 2, args
        at = len(str(path))
        assert capsys.readouterr().err == (
            f"error: {what} folder {str(path)!r}: byte 0xff at character {at} is not UTF-8 text, and the tokenizers and "
            "safetensors libraries open UTF-8 paths only; rename the folder (or a folder above it)\n"
        ), args


def test_an_empty_prompt_without_a_start_token_and_a_nan_temperature_are_user_errors(model_tok, monkeypatch):
    model, tok = model_tok
    with pytest.raises(UserError, match="--temperature nan: must be 0 "):
        generate(model, tok, ["hi"], temperature=float("nan"))
    monkeypatch.setattr("lorakit.generate.render_prompt", lambda tokenizer, prompt, chat: tok("hi")["input_ids"] if prompt else [])
    with pytest.raises(UserError, match="prompt 2 is empty and this tokenizer adds no start token"):
        generate(model, tok, ["hi", ""])


def test_a_config_that_is_not_utf8_and_a_zero_batch_size_exit_2(tmp_path, capsys):
    config = tmp_path / "u16.yaml"
    config.write_text("model: m\n", encoding="utf-16")
    assert main(["train", str(config)]) == 2
    assert f"{config}:1: not UTF-8 text (invalid start byte); save the file as UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", "m", "--data", "d.jsonl", "--batch-size", "0"])
    assert stop.value.code == 2 and "--batch-size: 0: give a number >= 1" in capsys.readouterr().err


def test_chat_refuses_bad_sampling_before_loading_and_seeds_must_fit_64_bits(capsys):
    for args, message in [(["--max-new-tokens", "0"], "--max-new-tokens 0: must be a whole number >= 1"), (["--seed", str(2**64)], "--seed 18446744073709551616: must fit")]:
        assert main(["chat", "--model", "no/such/model", *args]) == 2  # refused before the model is looked for
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_chat_template_that_refuses_or_does_not_parse_is_a_user_error(tmp_path):
    from lorakit.config import DataConfig
    from lorakit.data import load_dataset

    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    assert render_prompt(tok, [{"role": "user", "content": "hi"}], chat=True)  # what it accepts renders
    with pytest.raises(UserError, match=r"the chat template failed on this conversation \(System role not supported\)"):
        render_prompt(tok, [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}], chat=True)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }"  # does not parse
    with pytest.raises(UserError, match="the chat template does not parse"):
        render_prompt(tok, "hi", chat=True)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    with pytest.raises(UserError, match="the chat template does not parse"):
        load_dataset(path, tok, DataConfig(), use_cache=False)


def test_an_adapter_chat_template_that_is_not_utf8_exits_2(tmp_path, capsys, monkeypatch):
    model = tiny_llama()
    folder = save_model_folder(tmp_path / "m", model, make_tokenizer())
    inject_adapter(model, LoraConfig(r=2, alpha=4, targets=["q_proj"]))
    adapter = save_adapter(model, tmp_path / "a")
    (adapter / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")  # UTF-16's byte-order mark
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "1 plus 1 is", "completion": " 2"}) + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    model_args = ["--model", str(folder), "--adapter", str(adapter)]
    for args in (
        ["generate", *model_args, "--prompt", "x"],
        ["chat", *model_args],
        ["eval", *model_args, "--data", str(tmp_path / "d.jsonl")],
        ["merge", "--base", str(folder), "--adapter", str(adapter), "--out", str(tmp_path / "out")],
    ):
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert err == [f"error: {adapter / 'chat_template.jinja'}: not UTF-8 text (byte 0: invalid start byte); save the chat "
                       "template as UTF-8, or delete the file to use the model's own template"], args  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_sampling_errors_name_the_settings_at_fault():
    from lorakit.generate import check_sampling

    check_sampling(0.0, 1.0, 0, 1)
    with pytest.raises(UserError) as err:
        check_sampling(-1.0, 0.9, 50, 8)
    assert str(err.value) == "--temperature -1.0: must be 0 (greedy) or a finite number >= 1e-05"
    for tiny in (1e-45, 1e-6):  # the logits divided by it would overflow to inf, then NaN probabilities
        with pytest.raises(UserError, match=f"--temperature {tiny}: must be 0"):
            check_sampling(tiny, 1.0, 0, 8)
    check_sampling(1e-5, 1.0, 0, 8)
    with pytest.raises(UserError) as err:
        check_sampling(float("nan"), 0.0, 0, 0)
    assert str(err.value) == "--temperature nan: must be 0 (greedy) or a finite number >= 1e-05; --top-p 0.0: must be in (0, 1]; --max-new-tokens 0: must be a whole number >= 1"
    with pytest.raises(UserError, match=r"^--max-new-tokens 2.5: must be a whole number >= 1$"):
        check_sampling(0.0, 1.0, 0, 2.5)


def test_what_a_chat_template_would_leave_out_is_refused_before_the_first_turn(model_tok, tmp_path, capsys):
    model, _ = model_tok
    gemma_like = make_tokenizer()  # refuses a system turn, as Gemma's template does
    gemma_like.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not "
                                "supported') }}{% endif %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}")  # fmt: skip
    with pytest.raises(UserError) as err:
        chat_loop(model, gemma_like, system="Be terse.", stdin=io.StringIO("hi\n"), stdout=io.StringIO(), max_new_tokens=2)
    assert str(err.value) == ("--system 'Be terse.': the chat template refuses a system turn (System role not supported); "
                              "leave --system out, or use a model (or adapter) whose template takes one")  # fmt: skip
    # a prompts file's prompt the template fails on is named by its line
    folder = save_model_folder(tmp_path / "gemma-like", model, gemma_like)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in (
        [{"role": "user", "content": "hi"}], [], [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])))
    with pytest.raises(UserError, match=r"p.jsonl:2: 'messages' must"):
        read_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in (
        [{"role": "user", "content": "hi"}], [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])))
    assert main(["generate", "--model", str(folder), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'p.jsonl'}:2: the chat template failed on this conversation "
                                              "(System role not supported)")  # fmt: skip
    # tools beside a prompt whose template never reads them: said, not left out of the prompt silently
    prompt = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [{"type": "function", "function": {"name": "f"}}]}
    with pytest.raises(UserError, match=r"^the prompt has 'tools', but the chat template never reads `tools`"):
        generate(model, gemma_like, [prompt], max_new_tokens=2)


def test_chat_reads_a_byte_that_is_not_utf8_under_a_strict_locale(tmp_path):
    # under en_US.UTF-8, Python reads stdin strictly; PYTHONIOENCODING=utf-8 does the same here
    import os
    import subprocess
    import sys

    folder = save_model_folder(tmp_path / "m", tiny_llama(), make_tokenizer())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lorakit", "chat", "--model", str(folder), "--max-new-tokens", "2"],
                          input=b"caf\xe9\nhi\n", capture_output=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert b"(that line's byte 0xe9 at character 4 is not UTF-8 text; type it again in UTF-8)" in done.stderr


def test_argument_mistakes_are_one_line_naming_the_command(capsys, tmp_path):
    for args, said in [
        (["generate", "--model", "m", "--max-new-tokens", "abc"], "error: lorakit generate: argument --max-new-tokens: "
                                                                  "invalid int value: 'abc'; see lorakit generate --help"),
        (["chat", "--model", "m", "--bogus"], "error: lorakit chat: unrecognized arguments: --bogus; see lorakit chat --help"),
        (["chat"], "error: lorakit chat: the following arguments are required: --model; see lorakit chat --help"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and capsys.readouterr().err == said + "\n"
    with pytest.raises(SystemExit) as stop:  # what a bug report needs
        main(["--version"])
    import transformers

    import lorakit

    versions = f"lorakit {lorakit.__version__} (torch {torch.__version__}, transformers {transformers.__version__})"
    assert (stop.value.code, capsys.readouterr().out) == (0, versions + "\n")
    (tmp_path / "p.txt").write_text("x")  # a file where a folder belongs
    assert main(["generate", "--model", str(tmp_path / "p.txt"), "--prompt", "x"]) == 2
    assert f"model folder {str(tmp_path / 'p.txt')!r} is a file, not a folder" in capsys.readouterr().err


def test_generate_puts_a_system_message_first_in_chat_prompts_without_one(tmp_path, capsys):
    model, tok = tiny_llama(), make_tokenizer()
    folder = save_model_folder(tmp_path / "m", model, tok)
    system = {"role": "system", "content": "Be brief."}
    own = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "hello"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"messages": own}) + "\n")
    want = generate(model, tok, [[system, {"role": "user", "content": "hi"}], own], max_new_tokens=4)
    args = ["generate", "--model", str(folder), "--max-new-tokens", "4", "--system", "Be brief."]
    assert main([*args, "--prompts", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["completion"] for line in lines] == want  # the file's own system turn kept
    assert lines[0]["prompt"] == [{"role": "user", "content": "hi"}]  # printed as the file gave it
    assert main([*args, "--chat", "--prompt", "hi"]) == 0
    assert capsys.readouterr().out == want[0] + "\n"
    assert main([*args, "--prompt", "hi"]) == 2
    assert "--system goes with chat prompts: add --chat" in capsys.readouterr().err
