"""bitplan: budgeted mixed-precision quantization plans for LLMs."""
