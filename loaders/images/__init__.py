"""Image sources for the images stage (step 2): folders, `datasets` datasets, URL lists, the paper's named sets
and a synthetic demo generator — plus the pieces they share: image roots and path safety (``paths``), the
SSRF guard (``netguard``), async downloads (``download``), archives (``archives``), the dedup ledger (``dedup``).

Nothing is imported here, so ``import loaders.images.paths`` stays cheap for downstream stages.
"""
