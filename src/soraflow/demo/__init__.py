"""The local demo's inputs: synthetic videos with known cuts, and small random-weight models
saved like hub checkpoints, so the whole workflow runs without downloads.

Its own layer above inference: the demo models are built with the production classes (the
aesthetic head from scoring, transformers' and diffusers' models), which the production
layers never import from here.
"""
