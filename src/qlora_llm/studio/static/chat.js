// The chat playground: the same prompt to two models at once (the run and its base, or the run and another
// run of the same base), each answer streamed into its column from the studio's relay of the model server's
// /v1/chat/completions. Each column keeps its own conversation here, in the page: its user turns and its own
// answers, all sent every turn; "New conversation" clears both.
(function () {
  const second = document.getElementById("chat-second");
  if (second) {
    second.addEventListener("change", () => {
      document.getElementById("serve-command").textContent = second.selectedOptions[0].dataset.command;
    });
  }
  const form = document.getElementById("chat");
  if (!form) return;
  const run = form.dataset.run;
  const state = document.getElementById("chat-state");
  const send = document.getElementById("send");
  const error = document.getElementById("chat-error");
  const models = { base: null, tuned: null };
  const history = { base: [], tuned: [] }; // each column's finished turns: {role, content}

  async function poll() {
    const status = await (await fetch(`/runs/${run}/chat/status`)).json();
    state.textContent = status.state;
    if (status.state === "ready") {
      models.tuned = status.tuned;
      models.base = status.other || status.models.find((m) => m !== status.tuned) || null;
      document.getElementById("tuned-model").textContent = "fine-tuned: " + models.tuned;
      document.getElementById("base-model").textContent = !models.base
        ? "no base served"
        : (status.other ? "other run: " : "base: ") + models.base;
      send.disabled = false;
      return; // ready stays ready until someone stops it
    }
    send.disabled = true;
    if (status.state === "failed") document.getElementById("chat-log").textContent = status.log || "";
    if (status.state === "loading") setTimeout(poll, 1000);
  }

  // The column's conversation above its answer: the earlier turns and the user turn being answered.
  function show(side, messages) {
    const turns = messages.map((m) => {
      const turn = document.createElement(m.role === "user" ? "p" : "pre");
      turn.className = "turn " + m.role;
      turn.textContent = (m.role === "user" ? "you: " : "") + m.content;
      return turn;
    });
    document.getElementById(side + "-history").replaceChildren(...turns);
  }

  async function ask(side, prompt, sampling) {
    const out = document.getElementById(side + "-answer");
    const finish = document.getElementById(side + "-finish");
    out.textContent = "";
    finish.textContent = "";
    if (!models[side]) return;
    const messages = history[side].concat([{ role: "user", content: prompt }]);
    show(side, messages);
    const response = await fetch(`/runs/${run}/chat/complete`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": form.dataset.csrf },
      body: JSON.stringify(Object.assign({ model: models[side], messages: messages }, sampling)),
    });
    if (!response.ok) {
      error.textContent = side + ": " + (await response.text()).replace(/<[^>]*>/g, " ").trim();
      show(side, history[side]);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) { error.textContent = side + ": " + event.error.message; continue; }
        const choice = event.choices[0];
        if (choice.delta.content) out.textContent += choice.delta.content;
        if (choice.finish_reason) { finish.textContent = "finish: " + choice.finish_reason; finished = true; }
      }
    }
    // Only a whole answer joins the conversation; a failed turn is left out of this column's history.
    if (finished) history[side] = messages.concat([{ role: "assistant", content: out.textContent }]);
    out.dataset.done = "1";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.textContent = "";
    const data = new FormData(form);
    const prompt = data.get("prompt");
    if (!prompt.trim()) { error.textContent = "write a message first"; return; }
    const sampling = {};
    for (const key of ["temperature", "top_p", "max_tokens", "seed"]) sampling[key] = data.get(key);
    for (const side of ["base", "tuned"]) document.getElementById(side + "-answer").dataset.done = "";
    form.elements.prompt.value = "";
    send.disabled = true; // one turn at a time: the next one carries this one's answers
    Promise.all([ask("base", prompt, sampling), ask("tuned", prompt, sampling)]).finally(() => {
      send.disabled = false;
    });
  });

  document.getElementById("new-conversation").addEventListener("click", () => {
    for (const side of ["base", "tuned"]) {
      history[side] = [];
      show(side, []);
      document.getElementById(side + "-answer").textContent = "";
      document.getElementById(side + "-finish").textContent = "";
    }
    error.textContent = "";
  });
  poll();
})();
