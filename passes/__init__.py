"""fxcc.passes: one module per pass; importing this package registers them all by name."""

from . import (  # noqa: F401
    canonicalize,
    codegen,
    fuse,
    fuse_allreduce_rmsnorm,
    layer_skip,
    merge_linears,
    mixed_precision,
    raising,
    token_merge,
    tp_shard,
)
