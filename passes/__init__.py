"""fxcc.passes: one module per graph -> graph pass; `fxcc.pipeline.PASSES` names them for pipeline text."""
