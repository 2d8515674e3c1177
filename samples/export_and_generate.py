"""Export a model with activation sparsity, then generate with optimum-intel.

    python samples/export_and_generate.py [MODEL] [OUTPUT]
"""
import sys

from transformers import AutoTokenizer

import actsparse

model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
output = sys.argv[2] if len(sys.argv) > 2 else "smollm2-sparse"

actsparse.export(model, output, sparsity={"up": 0.3, "down": 0.5}, force=True)
print(actsparse.evaluate(output, samples=8))

tokenizer = AutoTokenizer.from_pretrained(output)
ov_model = actsparse.load(output)  # an optimum.intel.OVModelForCausalLM
inputs = tokenizer("The capital of France is", return_tensors="pt")
tokens = ov_model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(tokens[0], skip_special_tokens=True))
