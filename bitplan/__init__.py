"""bitplan: budgeted mixed-precision quantization plans for LLMs.

    import bitplan

    model = bitplan.load()                                   # embedded default, folder, hub id, .gguf
    scores = bitplan.score(model, "mxfp4,mxfp8")             # one calibration pass, cached
    plans = bitplan.plan(model, scores, [4.5, 5, 6])         # {4.5: Plan, 5: Plan, 6: Plan}
    quantized = bitplan.quantize(model, plans[5])            # fake-quantized torch model
    bitplan.evaluate(model, quantized, docs=200)             # lm-eval's tasks, offline
    bitplan.export(model, plans[5], "out/", "packed")        # fake, packed, compressed-tensors, gguf

    result = bitplan.search(model, "mxfp4,mxfp8", [4.5, 5, 6])  # score + plan, as `bitplan search`
    bitplan.compare(model, docs=600)                         # the seed's tables, as `bitplan compare`

The calls are in ``bitplan/api.py``; each imports its stage on first use, so ``import bitplan``
stays cheap.
"""

from bitplan.api import compare, evaluate, export, load, plan, quantize, score, search

__all__ = ["compare", "evaluate", "export", "load", "plan", "quantize", "score", "search"]
