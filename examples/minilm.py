"""MiniLM-L6 (all-MiniLM-L6-v2, real trained weights) for `fxcc search` / `fxcc explain`.

    fxcc search examples/minilm.py:model --inputs examples/minilm.py:inputs --output minilm.plan.json
"""

from fxcc.bench import minilm


def model():
    return minilm().model


def inputs(batch: int = 8, seq: int = 128):
    """A batch of real sentences, padded to `seq` tokens: (input_ids, attention_mask, token_type_ids)."""
    kw = minilm(batch, seq).kwargs
    return (kw["input_ids"], kw["attention_mask"], kw["token_type_ids"])
