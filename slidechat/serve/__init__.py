"""`slidechat serve`: a local web page to view a slide, ask the model about it and see where the answer came from.

`app` (FastAPI routes and the command), `engine` (the model queue and preprocessing jobs), `slides` (the
configured slide table and where each slide's outputs are), `attribution` (the per-patch heatmap).
"""
