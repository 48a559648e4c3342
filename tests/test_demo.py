"""The demo's pipeline at a reduced size, and the world LM it trains."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from pairfree.cli import main
from pairfree.world.lm import build_world_lm


def test_world_lm_round_trips_through_from_pretrained(tmp_path):
    build_world_lm(tmp_path / "lm", n_layer=1, n_embd=16, n_head=2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    text = "there is a big red circle, left of a small blue square."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert lm.config.vocab_size == len(tok) < 200  # a word-level vocabulary, not GPT-2's BPE


def test_demo_runs_end_to_end_at_a_reduced_size(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "30", "--corpus", "300", "--test-images", "12"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| CapDec, noise 0.016 |" in printed and "| no noise |" in printed
    assert "obj P" in printed and "exact" in printed
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 12 and "no noise" in page
    assert (out / "results.json").exists()
