"""The textual pipeline: parsing, options, errors with a caret under the offending column, the registry."""

from __future__ import annotations

import fxcc
import pytest
from fxcc.pipeline import Pass, PassResult


def caret_column(err: fxcc.PipelineError) -> int:
    """The column the caret line of the message points at, checked against the text line above it."""
    lines = str(err).splitlines()
    assert lines[-2] == "  " + err.text
    assert lines[-1].strip() == "^"
    return lines[-1].index("^") - 2


def parse_error(text: str) -> fxcc.PipelineError:
    with pytest.raises(fxcc.PipelineError) as e:
        fxcc.parse_pipeline(text)
    assert caret_column(e.value) == e.value.col
    return e.value


def test_parse_names_and_options():
    passes = fxcc.parse_pipeline("canonicalize{fold=false, max-fold-mb=1.5},fuse{max-group=4},codegen")
    assert [p.name for p in passes] == ["canonicalize", "fuse", "codegen"]
    canon, fuse, _ = passes
    assert canon.fold is False and canon.cse is True and canon.max_fold_mb == 1.5
    assert fuse.max_group == 4
    assert [p.spec() for p in passes] == ["canonicalize{fold=false,max-fold-mb=1.5}", "fuse{max-group=4}",
                                          "codegen"]


def test_spec_round_trips():
    text = "canonicalize{cse=false},fuse{max-group=8},codegen{backend=extern}"
    specs = ",".join(p.spec() for p in fxcc.parse_pipeline(text))
    assert specs == text
    assert [p.spec() for p in fxcc.parse_pipeline(specs)] == text.split(",")


def test_whitespace_and_empty_braces_are_accepted():
    passes = fxcc.parse_pipeline("  canonicalize{} ,\tfuse { max-group = 2 } , codegen ")
    assert [p.spec() for p in passes] == ["canonicalize", "fuse{max-group=2}", "codegen"]


def test_bool_spellings():
    for text, value in [("true", True), ("1", True), ("on", True), ("False", False), ("no", False)]:
        assert fxcc.parse_pipeline(f"canonicalize{{fold={text}}}")[0].fold is value


def test_default_expands():
    assert [p.name for p in fxcc.parse_pipeline("default")] == fxcc.DEFAULT_PIPELINE.split(",")
    names = [p.name for p in fxcc.parse_pipeline("canonicalize,default")]
    assert names == ["canonicalize", *fxcc.DEFAULT_PIPELINE.split(",")]


def test_default_takes_no_options():
    err = parse_error("fuse,default{x=1}")
    assert "'default' takes no options" in err.reason
    assert err.col == 5


def test_unknown_pass_suggests_a_name():
    err = parse_error("canonicalize,fuze,codegen")
    assert err.reason == "unknown pass 'fuze' (did you mean 'fuse'?)"
    assert err.col == 13


def test_unknown_pass_without_close_match_lists_passes():
    err = parse_error("canonicalize, zzz")
    assert err.reason.startswith("unknown pass 'zzz'; known passes: ")
    for name in ("canonicalize", "codegen", "fuse", "raise"):
        assert name in err.reason
    assert err.col == 14


def test_unknown_option_lists_options():
    err = parse_error("fuse,canonicalize{fold=true,folding=1}")
    assert err.reason == "pass 'canonicalize' has no option 'folding' (options: fold, cse, max-fold-mb)"
    assert err.col == 28


@pytest.mark.parametrize("text, col, fragment", [
    ("canonicalize{fold=maybe}", 18, "option 'fold' of pass 'canonicalize': expected true or false, got 'maybe'"),
    ("fuse{max-group=big}", 15, "option 'max-group' of pass 'fuse': expected an integer, got 'big'"),
    ("fuse{max-group=1.5}", 15, "expected an integer, got '1.5'"),
    ("canonicalize{max-fold-mb=lots}", 25, "expected a number, got 'lots'"),
    ("canonicalize{cse=true, fold= x}", 29, "expected true or false, got 'x'"),
])
def test_option_of_wrong_type(text, col, fragment):
    err = parse_error(text)
    assert fragment in err.reason
    assert err.col == col


def test_option_value_rejected_by_the_pass():
    err = parse_error("fuse,codegen{backend=cobol}")
    assert "pass 'codegen': unknown backend 'cobol'" in err.reason
    assert err.col == 5


@pytest.mark.parametrize("text, col, fragment", [
    ("canonicalize{fold=true", 12, "unbalanced braces: '{' after 'canonicalize' is never closed"),
    ("fuse{max-group=2,codegen{backend=extern}", 4, "'{' after 'fuse' is never closed"),
    ("canonicalize},fuse", 12, "'}' without a matching '{'"),
    ("canonicalize{fold=true}},fuse", 23, "'}' without a matching '{'"),
    ("canonicalize{fold}", 13, "option 'fold' needs a value: write key=value"),
    ("canonicalize{cse=false, fold}", 24, "option 'fold' needs a value"),
    ("canonicalize,", 13, "expected a pass name, found end of text"),
    ("canonicalize,fuse,", 18, "expected a pass name, found end of text"),
    (",fuse", 0, "expected a pass name, found ','"),
    ("canonicalize,,fuse", 13, "expected a pass name, found ','"),
    ("", 0, "expected a pass name, found end of text"),
    ("   ", 3, "expected a pass name, found end of text"),
    ("canonicalize fuse", 13, "expected ',' between passes, found 'f'"),
    ("canonicalize;fuse", 12, "expected ',' between passes, found ';'"),
])
def test_malformed_pipeline(text, col, fragment):
    err = parse_error(text)
    assert fragment in err.reason
    assert err.col == col


def test_pipeline_error_is_a_value_error():
    assert issubclass(fxcc.PipelineError, ValueError)


def test_non_string_pipeline_is_type_error():
    with pytest.raises(TypeError, match="passes must be a pipeline string"):
        fxcc.parse_pipeline(["fuse"])


# ------------------------------------------------------------------------------------------- registry


def test_register_a_pass_and_use_it_by_name(scratch_registry):
    from dataclasses import dataclass

    @fxcc.register
    @dataclass(frozen=True)
    class Nop(Pass):
        name = "test-nop"
        level: int = 3
        label: str = "x"

        def apply(self, gm, ctx):
            return PassResult(False, {"level": self.level})

    passes = fxcc.parse_pipeline("test-nop{level=7,label='hi'},canonicalize")
    assert isinstance(passes[0], Nop)
    assert passes[0].level == 7 and passes[0].label == "hi"
    assert passes[0].spec() == "test-nop{level=7,label=hi}"
    err = parse_error("test-nop{level=high}")
    assert "expected an integer, got 'high'" in err.reason and err.col == 15


def test_register_rejects_bad_and_duplicate_names(scratch_registry):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Bad(Pass):
        name = "Not_Kebab"

    with pytest.raises(ValueError, match="kebab-case name, got 'Not_Kebab'"):
        fxcc.register(Bad)

    @dataclass(frozen=True)
    class Clash(Pass):
        name = "fuse"

    with pytest.raises(ValueError, match="two passes are named 'fuse'"):
        fxcc.register(Clash)


def test_a_pass_that_writes_only_kernel_choices_does_not_propagate_values_again(monkeypatch):
    """codegen records each kernel's choice as attributes; a kernel op's outputs are what its body computes whatever
    runs it, so no FakeTensor propagation follows it (the passes that rewrite the graph are propagated after)."""
    import torch
    from fxcc import ir

    seen: list[str] = []
    propagate = ir.propagate
    monkeypatch.setattr(ir, "propagate", lambda gm, **kw: seen.append(kw.get("who", "")) or propagate(gm, **kw))
    monkeypatch.setenv("FXCC_VERIFY_EACH", "0")

    def f(x, r):
        return torch.nn.functional.layer_norm(x + r, (64,)) * 2

    x, r = torch.randn(8, 64), torch.randn(8, 64)
    cm = fxcc.compile(f, passes="canonicalize,raise,fuse,codegen{backend=extern}")
    torch.testing.assert_close(cm(x, r), f(x, r))
    stats = next(rec for rec in cm.fxcc.variants[-1].records if rec.spec.startswith("codegen")).result
    assert stats.changed and stats.stats["kernels"] >= 1  # it wrote the choices
    assert "after pass 'fuse'" in seen and "after pass 'codegen'" not in seen
