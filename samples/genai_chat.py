"""Chat with an actsparse export through openvino-genai, streaming the answer as it is generated.

    python samples/genai_chat.py OUTPUT [--device CPU] [--max-new-tokens 256]

The same pipeline without actsparse's helper: openvino_genai.LLMPipeline(OUTPUT, "CPU",
extensions=[actsparse.runtime_ext.openvino_extension()]). Type an empty line or Ctrl-D to quit.
"""
import argparse
import sys

import openvino_genai

import actsparse

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("output", help="folder written by actsparse export (OpenVINO)")
parser.add_argument("--device", default="CPU")
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

try:
    pipe = actsparse.genai_pipeline(args.output, args.device)
except actsparse.ActSparseError as err:
    sys.exit(f"genai_chat: error: {err}")
config = pipe.get_generation_config()
config.max_new_tokens = args.max_new_tokens


def stream(subword: str) -> openvino_genai.StreamingStatus:
    print(subword, end="", flush=True)
    return openvino_genai.StreamingStatus.RUNNING


pipe.start_chat()  # keeps the conversation's KV cache between turns and applies the chat template
try:
    while True:
        try:
            prompt = input("\n> ")
        except EOFError:
            break
        if not prompt.strip():
            break
        pipe.generate(prompt, config, stream)
        print()
finally:
    pipe.finish_chat()
