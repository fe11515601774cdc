"""Publishing a finished run: ``export`` (the ``final`` stage as LLaVA JSON and an image folder), ``hub`` (every
stage as a config of a Hub dataset repo, laid out locally, then uploaded) and ``card`` (the repo's README).
``writes`` makes an export's files appear whole or not at all."""

# The export's format names, in ``--help``'s order, for the command line's parser: importing
# ``processors.publish.formats`` (their ``FORMATS`` table, which a test holds equal to this) loads TRL's writer.
FORMAT_NAMES = ("llava", "trl", "llamafactory", "swift", "internvl", "qwenvl")
