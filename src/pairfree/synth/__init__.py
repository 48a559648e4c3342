"""Synthesis: text-to-image backends (and, in later steps, LLM rewriting, caption grouping and
NSFW filtering) that turn a caption corpus into synthetic training data for SaCap and ICSD."""
