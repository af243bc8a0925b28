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
        pieces: list[str] = []
        stream = generator.stream(history, params)
        # The whole turn is inside the try: a Ctrl-C that lands while the label is printed stops the
        # answer too, it does not end the program.
        try:
            write("assistant> ")
            for piece in stream:
                pieces.append(piece)
                write(piece)
        except KeyboardInterrupt:
            stream.close()  # stops generation at the next token (a no-op if it never started)
            write(" [stopped]")
        write("\n")
        answer = "".join(pieces).strip()
        if answer:
            history.append({"role": "assistant", "content": answer})
        else:
            # Stopped before a word (or an empty answer): forget the question too, so the history keeps
            # alternating user/assistant, which templates like Mistral's [INST] require.
            history.pop()
