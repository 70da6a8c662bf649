"""``r2 serve``: a local web page to ground sentences in a video, on a trained checkpoint.

:mod:`r2.serve.app` is the ASGI app (the page and its JSON API), :mod:`r2.serve.uploads` the
private folder holding the uploaded videos, :mod:`r2.serve.encodings` the encoded-video cache and
the model thread, :mod:`r2.serve.cli` the command. Importing this package is cheap (no torch).
"""
