"""`deltamem` console entry point.

    deltamem chat --backbone embedded --adapter models/TSW/adapter    # interactive REPL
    deltamem chat --backbone embedded --adapter models/TSW/adapter --script turns.jsonl

``--adapter`` also accepts the training output folder (``models/TSW``). The session speaks the chat
format stored in the adapter (system prompts, "<speaker>: <text>" turns, session headers); see
docs/CHAT.md. A chat script is JSON Lines; each line is one of
    {"role": "user" | "assistant" | "system", "content": "...",
     "speaker": "Ana", "timestamp": "3 May 2024", "session": "Session 1"}   tell this turn (last three optional)
    {"ask": "...", "write": false}                                  answer from the memory (prints JSON)
    {"save": "path/to/session"}                                     save the session (state + history)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn


def _fail(message: str) -> NoReturn:
    """An input problem: one line on stderr, exit status 2."""
    print(f"deltamem chat: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_model(args: argparse.Namespace):
    import torch

    from . import DeltaMemConfig, attach_delta_mem, load_adapter
    from .backbones import load_backbone

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model, tok = load_backbone(
        args.backbone, dtype=dtype, attn_implementation=args.attn_implementation, what="--backbone"
    )
    if args.adapter:
        model = load_adapter(model, args.adapter)
    else:
        print(
            "note: no --adapter given: δ-mem attached with zero corrections (answers = the backbone's)", file=sys.stderr
        )
        model = attach_delta_mem(model, DeltaMemConfig(output_init="zero"))
    return model.eval(), tok


def read_script(path: Path) -> list[dict[str, Any]]:
    """Parse and check a chat script before any model is loaded."""
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        _fail(f"{path}: not UTF-8 text (byte {e.start})")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})")
        ok = isinstance(item, dict) and ("ask" in item or "save" in item or ("role" in item and "content" in item))
        if not ok:
            got = sorted(item) if isinstance(item, dict) else type(item).__name__
            _fail(f"{path}:{n}: expected a line with 'ask', 'role'+'content' or 'save', got {got}")
        if "role" in item and item["role"] not in ("system", "user", "assistant"):
            _fail(f"{path}:{n}: field 'role' must be system, user or assistant, got {item['role']!r}")
        for key in ("content", "ask", "save", "speaker", "timestamp", "session"):
            if key in item and item[key] is not None and not isinstance(item[key], str):
                _fail(f"{path}:{n}: field {key!r} must be a string, got {type(item[key]).__name__}")
        items.append(item)
    return items


def _run_script(session: Any, items: list[dict[str, Any]], out) -> None:
    for item in items:
        if "ask" in item:
            answer = session.ask(item["ask"], write_turn=bool(item.get("write", False)))
            out.write(json.dumps({"ask": item["ask"], "answer": answer}) + "\n")
            out.flush()
        elif "save" in item:
            if not _save(session, item["save"]):
                raise SystemExit(2)
        else:
            session.add_message(
                item["role"],
                item["content"],
                speaker=item.get("speaker"),
                timestamp=item.get("timestamp"),
                session=item.get("session"),
            )


def _save(session: Any, target: str) -> bool:
    try:
        session.save(target)
    except FileExistsError as e:
        print(f"not saved: {e}", file=sys.stderr)
        return False
    return True


def _repl(session: Any) -> None:
    print("δ-mem chat. Lines are written into the memory; '? question' asks; ':save DIR'; ':quit'.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in (":q", ":quit", ":exit"):
            break
        if line.startswith(":save "):
            if _save(session, line[6:].strip()):
                print(f"saved to {line[6:].strip()}")
        elif line.startswith("?"):
            print(session.ask(line[1:].strip(), write_turn=True))
        else:
            session.add_message("user", line)


def cmd_chat(args: argparse.Namespace) -> int:
    from .session import MemorySession

    if args.script and not Path(args.script).is_file():
        _fail(f"--script: file not found: {args.script}")
    items = read_script(Path(args.script)) if args.script else None
    if args.adapter and not Path(args.adapter).is_dir():
        _fail(f"--adapter: directory not found: {args.adapter}")
    try:
        model, tok = _load_model(args)
    except (FileNotFoundError, ValueError) as e:  # unreadable / mismatched adapter: named in the message
        _fail(str(e))
    if args.session and (Path(args.session) / "session.json").is_file():
        session = MemorySession.load(args.session, model, tok)
    else:
        session = MemorySession(model, tok, args.system, args.recent_turns, args.max_new_tokens, protocol=args.protocol)
    if items is not None:
        _run_script(session, items, sys.stdout)
    else:
        _repl(session)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltamem", description="δ-mem: online memory for frozen LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a memory: write turns into the state, ask from it")
    chat.add_argument(
        "--backbone", default="embedded", help="hub id, local folder, or 'embedded' (SmolLM2-135M, offline)"
    )
    chat.add_argument(
        "--adapter",
        help="adapter directory (ours or upstream format) or a training output folder holding adapter/; "
        "omit for zero corrections",
    )
    chat.add_argument("--script", help="JSON Lines chat script to run non-interactively (see `deltamem chat --help`)")
    chat.add_argument("--session", help="resume the session saved in this directory, if it exists")
    chat.add_argument(
        "--system", default=None, help="system prompt for questions (default: the adapter's training one)"
    )
    chat.add_argument(
        "--protocol",
        default="training",
        choices=["training", "reference"],
        help="training: write told turns as training did, answer read-only (default); reference: the "
        "reference implementation's chat runtime (one cached stream, writes while reading and decoding)",
    )
    chat.add_argument("--recent-turns", type=int, default=0, help="also put the last N turns in the prompt as text")
    chat.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    chat.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="backbone weights dtype"
    )
    chat.add_argument(
        "--attn-implementation",
        default="auto",
        choices=["auto", "eager", "sdpa", "flash_attention_2"],
        help="attention kernel (auto: flash_attention_2 when installed and on a 16-bit CUDA model, else sdpa)",
    )
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .backbones import BackboneLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BackboneLoadError as err:  # a bad --backbone: one line, exit 2
        print(f"deltamem: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
