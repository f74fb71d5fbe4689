"""fxcc.codegen: one module per backend; each turns a `kernel` op into something callable."""
