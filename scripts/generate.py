"""Generate text with a model folder, a Hub id or a PEFT adapter folder.

    python scripts/generate.py runs/stdlib-tiny/final --prompt "def "              # continue a text
    python scripts/generate.py runs/sft/final --chat --prompt "Name three colors."  # one chat reply
    python scripts/generate.py runs/sft/final --chat                                # chat: one message a line

With --chat, prompts go through the tokenizer's chat template, exactly as in training and in
pipeline("text-generation"); the conversation is kept (oldest turns dropped when the context is full)
until /reset. A model without a chat template continues each line as plain text.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from hf_gpt.config import ScriptParser, UserError, run_cli  # noqa: E402
from hf_gpt.generation import chat_prompt_ids, generate  # noqa: E402
from hf_gpt.loading import context_length, load_model  # noqa: E402


def parse_args():
    parser = ScriptParser(description=__doc__)
    parser.add_argument("model", help="Model folder (e.g. runs/sft/final), Hub id, or PEFT adapter folder.")
    parser.add_argument("--prompt", help="Text to continue (with --chat: one user message).")
    parser.add_argument("--chat", action="store_true",
                        help="Use the chat template; without --prompt, read messages from stdin.")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--greedy", action="store_true", help="Always the most likely token (no sampling).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.prompt is None and not args.chat:
        parser.error("give --prompt, or --chat to talk to the model")
    return args


def main():
    args = parse_args()
    if args.max_new_tokens < 1:  # before the model loads (generate_ids refuses it too, later)
        raise UserError(f"--max_new_tokens must be 1 or more, not {args.max_new_tokens}")
    if not args.greedy and not 0 < args.temperature < math.inf:  # sampling divides the scores by it
        raise UserError(f"--temperature must be a number above 0, not {args.temperature}; for the most likely token "
                        "every time, use --greedy")
    set_seed(args.seed)
    model, tokenizer = load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                   top_k=args.top_k)
    chat = args.chat and tokenizer.chat_template is not None
    if args.chat and not chat:
        print(f"note: {args.model} has no chat template; each message is continued as plain text", file=sys.stderr)

    def reply(messages: list[dict]) -> str:
        if not chat:
            return generate(model, tokenizer, [tokenizer(messages[-1]["content"])["input_ids"]], **options)[0]
        # Drop the oldest exchanges until the prompt leaves room for a reply (half the context at least).
        context = context_length(model, tokenizer)
        room = context - min(args.max_new_tokens, context // 2)
        while len(messages) > 1 and len(chat_prompt_ids(tokenizer, messages)) > room:
            del messages[:2]
        return generate(model, tokenizer, [chat_prompt_ids(tokenizer, messages)], **options)[0].strip()

    if args.prompt is not None:
        text = reply([{"role": "user", "content": args.prompt}])
        print(text if chat else args.prompt + text)
        return
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message and press Enter; /reset forgets the conversation; Ctrl-D ends.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line.strip()})
        try:
            answer = reply(messages)
        except UserError as e:  # a message too long for the context: say so and carry on
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        print(answer, flush=True)
        if chat:
            messages.append({"role": "assistant", "content": answer})
        else:  # plain continuation has no conversation to keep
            messages.clear()


if __name__ == "__main__":
    run_cli(main)
