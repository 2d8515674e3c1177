"""Chat with an actsparse export through openvino-genai, streaming each answer as it is generated.

    python samples/genai_chat.py OUTPUT [--device CPU] [--max-new-tokens 256]

The same pipeline without actsparse's helper: openvino_genai.LLMPipeline(OUTPUT, "CPU",
extensions=[actsparse.runtime_ext.openvino_extension()]). The model needs a chat template (its tokenizer's).
Type an empty line or Ctrl-D to quit.
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
if not pipe.get_tokenizer().chat_template:
    sys.exit(f"genai_chat: error: {args.output} has no chat template: this model was not made for chat")
config = pipe.get_generation_config()
config.max_new_tokens = args.max_new_tokens


def stream(subword: str) -> openvino_genai.StreamingStatus:
    print(subword, end="", flush=True)
    return openvino_genai.StreamingStatus.RUNNING


history = openvino_genai.ChatHistory()  # the whole conversation goes through the chat template each turn
while True:
    try:
        prompt = input("\n> ")
    except EOFError:
        break
    if not prompt.strip():
        break
    history.append({"role": "user", "content": prompt})
    answer = pipe.generate(history, config, stream)
    history.append({"role": "assistant", "content": str(answer)})
    print()
