"""fxcc.passes: one module per pass; importing this package registers them all by name."""

from . import canonicalize, codegen, fuse, raising  # noqa: F401
