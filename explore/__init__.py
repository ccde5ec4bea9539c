"""`explore`: a local web page to see and steer what a model learned (concepts, retrieval, generation, runs).

The process serves the page itself (plain HTML/JS/CSS from `explore/static/`, no CDN, no build step) on
127.0.0.1 by default; any other host needs the token printed in the URL. Every number and image on the page
comes from the functions the CLI commands use (`testing/`, `models/`, `datasets/`); model calls run on one
inference worker whose slider requests are coalesced. `cli/explore.py` parses the options and calls
`explore.app.serve`.
"""
