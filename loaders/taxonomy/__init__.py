"""Taxonomy sources: seed trees (YAML or ``~``-joined lines), imported ``tasktype.txt`` files, the path grammar."""
