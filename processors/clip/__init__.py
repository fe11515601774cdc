"""CLIP matching: embed task types once, stream images through a DataLoader, keep each image's top-k.

Modules, one job each: ``models`` (load an open_clip model lazily, once per process), ``text`` (task-type
texts, their embeddings and the on-disk cache), ``images`` (the DataLoader whose workers decode and
preprocess, carrying per-image errors), ``topk`` (cosine top-k by chunked matmul on the device) and
``matcher`` (the object a stage holds: ties the four together). Nothing heavy is imported here.
"""
