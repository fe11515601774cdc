"""Step 1, the taxonomy: prompts, reply parsing, sibling dedup, level-by-level growth, stats and pictures."""
