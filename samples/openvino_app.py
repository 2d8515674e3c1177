"""Run an actsparse export with plain OpenVINO: greedy decoding with the stateful KV cache.

    python samples/openvino_app.py OUTPUT ["prompt"]
"""
import sys

import numpy as np
import openvino as ov
from transformers import AutoTokenizer

import actsparse.runtime_ext

folder = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "The capital of France is"

core = ov.Core()
core.add_extension(actsparse.runtime_ext.openvino_extension())  # ActSparseMatMul (opset "actsparse")
compiled = core.compile_model(f"{folder}/openvino_model.xml", "CPU")
request = compiled.create_infer_request()
tokenizer = AutoTokenizer.from_pretrained(folder)

ids = tokenizer(prompt, return_tensors="np")["input_ids"]
request.reset_state()
position, generated = 0, []
for _ in range(20):
    n = ids.shape[1]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, position + n), np.int64),
            "position_ids": np.arange(position, position + n, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
    logits = request.infer(feed)["logits"]
    position += n
    ids = logits[:, -1:].argmax(-1).astype(np.int64)  # one token per step: the sparse decode path
    generated.append(int(ids[0, 0]))
print(prompt + tokenizer.decode(generated, skip_special_tokens=True))
