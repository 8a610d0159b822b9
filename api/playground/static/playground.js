// The playground's behaviour: build a job from the form, stream its answer, stop it, show errors.
// Plain JavaScript, no dependencies. The API is the one validator: this file sends what the user
// typed and shows the API's answer next to the field it names.
"use strict";

(() => {
  const API_KEY_STORAGE = "genqueue.apiKey";
  // Error fields the API names that have no input of their own, and where to show them instead.
  const ERROR_HOMES = { messages: "prompt" };

  const $ = (id) => document.getElementById(id);
  const transcript = $("transcript");
  const composer = $("composer");
  const promptInput = $("prompt");
  const systemInput = $("system");
  const rawInput = $("param-raw");
  const apiKeyInput = $("api-key");
  const sendButton = $("send");
  const stopButton = $("stop");
  const clearButton = $("clear");
  const formError = $("form-error");
  const emptyNote = $("empty-transcript").cloneNode(true);

  // The conversation sent with each request: turns are added when their answer ends.
  let history = [];
  let current = null; // the answer being streamed: {jobId, stopping}

  apiKeyInput.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  apiKeyInput.addEventListener("input", () => sessionStorage.setItem(API_KEY_STORAGE, apiKeyInput.value.trim()));

  const syncRaw = () => {
    systemInput.disabled = rawInput.checked;
  };
  rawInput.addEventListener("change", syncRaw);
  syncRaw();

  function headers(extra) {
    const key = apiKeyInput.value.trim();
    return { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...extra };
  }

  // ---- errors next to fields ----

  function clearErrors() {
    for (const element of document.querySelectorAll("[data-error-for]")) {
      element.textContent = "";
      element.hidden = true;
    }
    for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    formError.textContent = "";
    formError.hidden = true;
  }

  // marshmallow nests errors for lists and objects: flatten them to "where: message" strings.
  function flatten(messages, where = "") {
    if (typeof messages === "string") return [where ? `${where}: ${messages}` : messages];
    if (Array.isArray(messages)) return messages.flatMap((m) => flatten(m, where));
    return Object.entries(messages || {}).flatMap(([key, value]) => flatten(value, where ? `${where} ${key}` : key));
  }

  function showFieldError(name, text) {
    const home = ERROR_HOMES[name] || name;
    const element = document.querySelector(`[data-error-for="${CSS.escape(home)}"]`);
    if (!element) return false;
    element.textContent = element.textContent ? `${element.textContent} ${text}` : text;
    element.hidden = false;
    const input = document.querySelector(`[name="${CSS.escape(home)}"]`);
    if (input) input.setAttribute("aria-invalid", "true");
    return true;
  }

  function showFormError(text) {
    formError.textContent = text;
    formError.hidden = false;
  }

  // Show an API error answer ({"error": {"code", "message", "fields"}}) where it belongs.
  function showApiError(status, error) {
    if (status === 401 || status === 403) {
      showFieldError("api_key", error.message);
      apiKeyInput.focus();
      return;
    }
    const unplaced = [];
    for (const [name, messages] of Object.entries(error.fields || {})) {
      const nested = typeof messages === "object" && !Array.isArray(messages);
      const text = flatten(messages, nested ? name : "").join(" ");
      if (!showFieldError(name, text)) unplaced.push(`${name}: ${text}`);
    }
    const first = document.querySelector('[aria-invalid="true"]'); // the first in the page's order
    if (unplaced.length || !first) showFormError([error.message, ...unplaced].join(" "));
    if (first) first.focus();
  }

  // ---- the request ----

  function buildBody(text) {
    const body = { stream: true };
    if (rawInput.checked) {
      body.raw = true;
      body.prompt = text;
    } else {
      const system = systemInput.value.trim();
      body.messages = [...(system ? [{ role: "system", content: system }] : []), ...history, { role: "user", content: text }];
    }
    for (const input of document.querySelectorAll("[data-param]")) {
      const raw = input.value.trim();
      if (raw === "") {
        // A number input holds "" for text it cannot parse; say so rather than drop the field.
        if (input.validity.badInput) throw { fields: { [input.name]: ["Not a valid number."] } };
        continue;
      }
      const value = Number(raw);
      body[input.name] = Number.isFinite(value) ? value : raw; // the API names what is wrong
    }
    return body;
  }

  // ---- the transcript ----

  function addMessage(role, text) {
    $("empty-transcript")?.remove();
    const article = $("message-template").content.firstElementChild.cloneNode(true);
    article.classList.add(role);
    article.querySelector(".role").textContent = role === "user" ? "You" : "Assistant";
    const textElement = article.querySelector(".text");
    textElement.append(document.createTextNode(text));
    transcript.append(article);
    transcript.scrollTop = transcript.scrollHeight;
    return article;
  }

  function appendText(article, chunk) {
    const nearBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
    article.querySelector(".text").firstChild.appendData(chunk);
    if (nearBottom) transcript.scrollTop = transcript.scrollHeight;
  }

  function showStats(article, parts) {
    const stats = article.querySelector(".stats");
    stats.replaceChildren(
      ...parts.map(([name, label, value, title]) => {
        const span = document.createElement("span");
        span.dataset.stat = name;
        span.title = title;
        span.textContent = `${label} ${value}`;
        return span;
      }),
    );
    stats.hidden = false;
  }

  // ---- server-sent events over fetch (EventSource cannot POST) ----

  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { event: "message", id: null, data: [] };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue; // keep-alive comments
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const fieldValue = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data.push(fieldValue);
          else if (field === "event") event.event = fieldValue;
          else if (field === "id") event.id = fieldValue;
        }
        if (event.data.length) yield { ...event, data: event.data.join("\n") };
      }
    }
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    clearButton.disabled = busy;
    stopButton.disabled = !busy;
    stopButton.textContent = "Stop";
    transcript.setAttribute("aria-busy", String(busy));
  }

  async function send() {
    if (current) return;
    clearErrors();
    const text = promptInput.value;
    if (!text.trim()) {
      showFieldError("prompt", "Type a message first.");
      promptInput.focus();
      return;
    }
    let body;
    try {
      body = buildBody(text);
    } catch (invalid) {
      showApiError(400, invalid);
      return;
    }

    current = { jobId: null, stopping: false };
    setBusy(true);
    const started = performance.now();
    let response;
    try {
      response = await fetch("/v1/jobs", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
      });
    } catch (failure) {
      showFormError(`Could not reach the API: ${failure.message}`);
      current = null;
      setBusy(false);
      return;
    }
    if (!response.ok) {
      let error = { message: `The API answered ${response.status} ${response.statusText}.` };
      try {
        error = (await response.json()).error || error;
      } catch {
        // not JSON: keep the status line
      }
      showApiError(response.status, error);
      current = null;
      setBusy(false);
      return;
    }

    current.jobId = response.headers.get("X-Job-Id");
    const turn = { role: "user", content: text };
    addMessage("user", text);
    const answer = addMessage("assistant", "");
    answer.dataset.jobId = current.jobId;
    answer.setAttribute("aria-busy", "true");
    promptInput.value = "";
    promptInput.focus();

    let firstTokenAt = null;
    let ended = false;
    try {
      for await (const event of sseEvents(response)) {
        if (event.data === "[DONE]") break;
        const payload = JSON.parse(event.data);
        if (event.event === "error") {
          const error = payload.error || {};
          answer.classList.add("failed");
          answer.dataset.status = "failed";
          showStats(answer, [["error", "failed:", `${error.code}: ${error.message}`, "The job failed"]]);
          ended = true;
        } else if (payload.usage || payload.finish_reason) {
          const endedAt = performance.now();
          const content = answer.querySelector(".text").textContent;
          history.push(turn, { role: "assistant", content });
          answer.dataset.status = payload.finish_reason === "cancelled" ? "cancelled" : "succeeded";
          showStats(answer, answerStats(payload, started, firstTokenAt, endedAt));
          ended = true;
        } else if (payload.response) {
          if (firstTokenAt === null) firstTokenAt = performance.now();
          appendText(answer, payload.response);
        }
      }
      if (!ended) showStats(answer, [["error", "stream ended early:", "reload the job to see its end", ""]]);
    } catch (failure) {
      showStats(answer, [["error", "stream broke:", failure.message, ""]]);
    } finally {
      answer.removeAttribute("aria-busy");
      current = null;
      const focusWasOnStop = document.activeElement === stopButton || document.activeElement === document.body;
      setBusy(false);
      if (focusWasOnStop) promptInput.focus(); // the Stop button is disabled now: keep keyboard users in place
    }
  }

  function answerStats(payload, started, firstTokenAt, endedAt) {
    const usage = payload.usage || {};
    const tokens = usage.completion_tokens ?? 0;
    const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;
    const stats = [
      [
        "usage",
        "tokens:",
        `${usage.prompt_tokens ?? "?"} in, ${tokens} out`,
        `prompt ${usage.prompt_tokens}, completion ${tokens}, total ${usage.total_tokens}`,
      ],
    ];
    if (firstTokenAt !== null) {
      stats.push(["ttft", "first token:", seconds(firstTokenAt - started), "time from Send to the first text"]);
      // Decoding speed: the tokens after the first, over the time they took.
      const decodeMs = endedAt - firstTokenAt;
      if (tokens > 1 && decodeMs > 0) {
        const rate = ((tokens - 1) * 1000) / decodeMs;
        stats.push(["rate", "speed:", `${rate.toFixed(1)} tokens/s`, "tokens after the first, per second"]);
      }
    }
    stats.push(["finish", "finish:", payload.finish_reason, "why the answer ended"]);
    return stats;
  }

  async function stop() {
    if (!current || !current.jobId || current.stopping) return;
    current.stopping = true;
    stopButton.disabled = true;
    stopButton.textContent = "Stopping…";
    const response = await fetch(`/v1/jobs/${encodeURIComponent(current.jobId)}`, {
      method: "DELETE",
      headers: headers(),
    }).catch((failure) => ({ ok: false, status: 0, statusText: failure.message }));
    // 409: it ended on its own meanwhile; the stream brings its end either way.
    if (!response.ok && response.status !== 409) {
      showFormError(`Could not stop the job: ${response.status} ${response.statusText}`);
      if (current) {
        current.stopping = false;
        stopButton.disabled = false;
        stopButton.textContent = "Stop";
      }
    }
  }

  // ---- wiring ----

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  promptInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && current) {
      event.preventDefault();
      stop();
    }
  });
  stopButton.addEventListener("click", stop);
  clearButton.addEventListener("click", () => {
    history = [];
    transcript.replaceChildren(emptyNote.cloneNode(true));
    clearErrors();
    promptInput.focus();
  });
})();
