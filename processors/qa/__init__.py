"""Step 4, question–answer generation: one GPT-4o request per image with its kept task types.

``prompt`` builds the request and the repair turn, ``parse`` reads a reply in whatever JSON shape it came,
``validate`` judges each question–answer item against the image's task types and the config, ``generate``
runs one shard of images through the LLM engine, ``simulate`` answers the prompt inside the simulator and
``estimate`` projects requests and tokens per image. The stage itself is ``processors.stages.qa``.
"""
