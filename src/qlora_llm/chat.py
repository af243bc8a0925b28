"""The interactive chat loop behind `qlora-llm chat`: streamed answers, conversation history, commands.

Input and output are passed in (`read`, `write`), so the loop is tested with scripted lines and the CLI
gives it the terminal. `/reset` forgets the conversation, `/exit` (or EOF, or Ctrl-C at the prompt)
ends it; Ctrl-C while an answer streams stops that answer at the next token and keeps the program.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from qlora_llm.generate import Generator, SamplingParams

log = logging.getLogger(__name__)

HELP = "Commands: /reset forgets the conversation, /exit quits. Ctrl-C stops an answer."


def chat_loop(
    generator: Generator,
    params: SamplingParams,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], None],
    system: str | None = None,
) -> list[dict[str, str]]:
    """Run the conversation until /exit or EOF; returns the history as it stood at the end."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    write(HELP + "\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        if not line:
            continue
        if line == "/exit":
            return history
        if line == "/reset":
            history = history[:1] if system else []
            write("(conversation reset)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}. {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        write("assistant> ")
        pieces: list[str] = []
        stream = generator.stream(history, params)
        try:
            for piece in stream:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stream.close()  # stops generation at the next token
            write(" [stopped]")
        write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
