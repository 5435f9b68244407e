"""Ground both packages stand on: atomic files, JSON, hashing, the error convention and the command dispatcher.

`preprocessing/` and `slidechat/` import from here; this package imports from neither.
"""

__version__ = "0.1.0"
