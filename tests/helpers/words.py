"""The words of the tiny word-level tokenizer, and the tiny texts the CLI tests read."""

WORDS = "the cat sat on a mat and dog ran far away so it was good".split()
