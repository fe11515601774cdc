"""Publishing a finished run: ``export`` (the ``final`` stage as LLaVA JSON and an image folder), ``hub`` (every
stage as a config of a Hub dataset repo, laid out locally, then uploaded) and ``card`` (the repo's README).
``writes`` makes an export's files appear whole or not at all."""
