// The chat playground: the same prompt to the base and the fine-tuned model at once, each answer streamed
// into its column from the studio's relay of the model server's /v1/chat/completions.
(function () {
  const form = document.getElementById("chat");
  if (!form) return;
  const run = form.dataset.run;
  const state = document.getElementById("chat-state");
  const send = document.getElementById("send");
  const error = document.getElementById("chat-error");
  const models = { base: null, tuned: null };

  async function poll() {
    const status = await (await fetch(`/runs/${run}/chat/status`)).json();
    state.textContent = status.state;
    if (status.state === "ready") {
      models.tuned = status.tuned;
      models.base = status.models.find((m) => m !== status.tuned) || null;
      document.getElementById("tuned-model").textContent = "fine-tuned: " + models.tuned;
      document.getElementById("base-model").textContent = models.base ? "base: " + models.base : "no base served";
      send.disabled = false;
      return; // ready stays ready until someone stops it
    }
    send.disabled = true;
    if (status.state === "failed") document.getElementById("chat-log").textContent = status.log || "";
    if (status.state === "loading") setTimeout(poll, 1000);
  }

  async function ask(side, body) {
    const out = document.getElementById(side + "-answer");
    const finish = document.getElementById(side + "-finish");
    out.textContent = "";
    finish.textContent = "";
    if (!models[side]) return;
    const response = await fetch(`/runs/${run}/chat/complete`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": form.dataset.csrf },
      body: JSON.stringify(Object.assign({ model: models[side] }, body)),
    });
    if (!response.ok) {
      error.textContent = side + ": " + (await response.text()).replace(/<[^>]*>/g, " ").trim();
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
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
        if (choice.finish_reason) finish.textContent = "finish: " + choice.finish_reason;
      }
    }
    out.dataset.done = "1";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    error.textContent = "";
    const data = new FormData(form);
    const body = {};
    for (const key of ["prompt", "temperature", "top_p", "max_tokens", "seed"]) body[key] = data.get(key);
    for (const side of ["base", "tuned"]) document.getElementById(side + "-answer").dataset.done = "";
    Promise.all([ask("base", body), ask("tuned", body)]);
  });
  poll();
})();
