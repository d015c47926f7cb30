// Demo chat page: POST with background: true, then follow the completion with EventSource.
//
// EventSource reconnects by itself after a drop and sends Last-Event-ID (every event on the
// reattach stream carries id: <seq>), so the server resumes right after the last event we got.
// We still skip any event whose sequence_number is not above the last one applied, so a replay
// can never duplicate text. No framework, no build step, no CDN.
//
// A reasoning model's thinking arrives as delta.reasoning_content (or delta.reasoning, by the
// server's --reasoning-field) before the answer: it goes into a fold above the answer, closed
// unless the reader opens it.
//
// A server started with --api-key needs the key on every /v1 request: the page keeps it in this
// tab's sessionStorage (gone when the tab closes, never sent to another origin), sends it as
// Authorization: Bearer on fetch, and as ?api_key= on the EventSource, which cannot send headers.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const app = $("app");
  const form = $("ask");
  const promptBox = $("prompt");
  const modelSelect = $("model");
  const sendButton = $("send");
  const stopButton = $("stop");
  const statusLine = $("status");
  const answerBox = $("answer");
  const reasoningBox = $("reasoning");
  const reasoningSummary = $("reasoning-summary");
  const reasoningText = $("reasoning-text");
  const meta = $("meta");
  const stats = { ttft: $("ttft"), tokens: $("tokens"), tps: $("tps"), reconnects: $("reconnects") };
  const keyBox = $("api-key");
  const KEY_ITEM = "openai-stream-server.api-key";

  function apiKey() {
    return keyBox.value.trim();
  }

  // fetch with the key, when there is one
  function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (apiKey()) headers.set("Authorization", "Bearer " + apiKey());
    return fetch(path, { ...options, headers });
  }

  function withKey(url) {
    if (!apiKey()) return url;
    return url + (url.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(apiKey());
  }

  let run = null; // the completion being shown: {id, source, ...}

  function setState(state, message) {
    app.dataset.state = state;
    statusLine.textContent = message;
    statusLine.className = "status " + state;
    const live = state === "waiting" || state === "streaming" || state === "reconnecting";
    answerBox.classList.toggle("live", live);
    stopButton.disabled = !live;
  }

  function fmtMs(ms) {
    return ms < 1000 ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(2) + " s";
  }

  function showStats(r) {
    const now = r.endedAt ?? performance.now();
    stats.ttft.textContent = r.firstAt == null ? "–" : fmtMs(r.firstAt - r.startedAt);
    stats.tokens.textContent = r.tokens ? String(r.tokens) : "–";
    const seconds = r.firstAt == null ? 0 : (now - r.firstAt) / 1000;
    stats.tps.textContent = r.tokens > 1 && seconds > 0 ? (r.tokens / seconds).toFixed(1) : "–";
    stats.reconnects.textContent = String(Math.max(0, r.opens - 1));
  }

  function endThinking(r) {
    r.thoughtFor = performance.now() - r.thinkingAt;
    reasoningSummary.textContent = "Reasoning · " + fmtMs(r.thoughtFor);
    if (app.dataset.state === "streaming") statusLine.textContent = "streaming…";
  }

  function finish(r, state, message) {
    if (r.thinkingAt != null && r.thoughtFor == null) endThinking(r);
    if (r.source) r.source.close();
    r.endedAt = r.endedAt ?? performance.now();
    clearInterval(r.ticker);
    showStats(r);
    setState(state, message);
    sendButton.disabled = false;
  }

  function apply(r, chunk) {
    if (chunk.error) {
      // An error event; [DONE] follows. A Stop shows up here as code "cancelled".
      r.endedAt = performance.now();
      r.failure = chunk.error;
      return;
    }
    const seq = chunk.sequence_number;
    if (typeof seq === "number") {
      if (seq <= r.lastSeq) {
        app.dataset.skipped = String(Number(app.dataset.skipped) + 1);
        return;
      }
      r.lastSeq = seq;
    }
    app.dataset.applied = String(Number(app.dataset.applied) + 1);
    const choice = chunk.choices && chunk.choices[0];
    const delta = choice && choice.delta ? choice.delta : {};
    const content = delta.content;
    // With --reasoning-field both, the two fields hold the same text: read one.
    const thought = delta.reasoning_content ?? delta.reasoning;
    if (thought || content) {
      if (r.firstAt == null) {
        r.firstAt = performance.now();
        setState("streaming", thought ? "thinking…" : "streaming…");
      }
    }
    if (thought) {
      if (reasoningBox.hidden) {
        reasoningBox.hidden = false;
        r.thinkingAt = performance.now();
      }
      r.reasoning.appendData(thought);
      app.dataset.reasoning = String(r.reasoning.length);
      if (typeof seq === "number") r.tokens = Math.max(r.tokens, seq + 1);
      showStats(r);
    }
    if (content) {
      if (r.thinkingAt != null && r.thoughtFor == null) endThinking(r);
      r.text.appendData(content);
      // One chunk per token for echo; the finish chunk's usage corrects it at the end.
      if (typeof seq === "number") r.tokens = Math.max(r.tokens, seq + 1);
      showStats(r);
    }
    if (chunk.usage) r.tokens = chunk.usage.completion_tokens;
    if (choice && choice.finish_reason) {
      r.finishReason = choice.finish_reason;
      r.endedAt = performance.now();
    }
  }

  async function explainClosed(r) {
    // EventSource gives no detail when it gives up (e.g. 404 once the completion has expired).
    let message = "the connection was lost";
    try {
      const response = await api("/v1/chat/completions/" + encodeURIComponent(r.id));
      const body = await response.json();
      if (body.error) message = body.error.message;
    } catch (_) {
      message = "the server is unreachable";
    }
    if (run === r) finish(r, "error", message);
  }

  function showQueued(place) {
    app.dataset.queued = String(place);
    setState("waiting", place === 1 ? "queued · next in line" : `queued · position ${place}`);
  }

  function follow(r, streamUrl) {
    const source = new EventSource(withKey(streamUrl));
    r.source = source;
    source.addEventListener("open", () => {
      r.opens += 1;
      app.dataset.opens = String(r.opens);
      if (app.dataset.state === "reconnecting") setState(r.firstAt == null ? "waiting" : "streaming", "streaming… (resumed after a drop)");
      showStats(r);
    });
    // Its place while it waits in the server's queue for its model (a named event: EventSource skips comments).
    source.addEventListener("queued", (event) => {
      if (run !== r || r.firstAt != null) return;
      let place;
      try {
        place = JSON.parse(event.data).queue_position;
      } catch (_) {
        return;
      }
      showQueued(place);
    });
    source.addEventListener("message", (event) => {
      if (run !== r) return;
      if (event.data === "[DONE]") {
        if (r.failure && r.failure.code === "cancelled") finish(r, "cancelled", "stopped");
        else if (r.failure) finish(r, "error", r.failure.message);
        else finish(r, "done", "done · finish_reason " + (r.finishReason || "stop"));
        return;
      }
      let chunk;
      try {
        chunk = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      apply(r, chunk);
    });
    source.addEventListener("error", () => {
      if (run !== r) return;
      if (source.readyState === EventSource.CLOSED) {
        explainClosed(r);
        return;
      }
      app.dataset.drops = String(Number(app.dataset.drops) + 1);
      setState("reconnecting", "connection dropped, reconnecting…");
    });
  }

  async function submit() {
    const prompt = promptBox.value;
    if (!prompt.trim()) return;
    if (run) {
      if (run.source) run.source.close();
      clearInterval(run.ticker);
      if (app.dataset.state !== "done") api(`/v1/chat/completions/${encodeURIComponent(run.id)}/cancel`, { method: "POST" });
    }
    answerBox.textContent = "";
    reasoningText.textContent = "";
    reasoningBox.hidden = true;
    reasoningBox.open = false;
    reasoningSummary.textContent = "Thinking…";
    const r = {
      id: null, source: null, text: document.createTextNode(""), reasoning: document.createTextNode(""),
      lastSeq: -1, tokens: 0, opens: 0, startedAt: performance.now(), firstAt: null, endedAt: null,
      thinkingAt: null, thoughtFor: null, finishReason: null, failure: null, ticker: 0,
    };
    answerBox.appendChild(r.text);
    reasoningText.appendChild(r.reasoning);
    run = r;
    Object.assign(app.dataset, { opens: "0", drops: "0", applied: "0", skipped: "0", id: "", reasoning: "0", queued: "" });
    meta.textContent = "";
    sendButton.disabled = true;
    setState("waiting", "waiting for the first token…");
    showStats(r);

    const body = { messages: [{ role: "user", content: prompt }], stream: true, background: true };
    if (modelSelect.value) body.model = modelSelect.value;
    let answer;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      answer = await response.json();
      if (!response.ok) throw new Error(answer.error ? answer.error.message : "HTTP " + response.status);
    } catch (error) {
      if (run === r) finish(r, "error", error.message);
      return;
    }
    if (run !== r) return;
    r.id = answer.id;
    app.dataset.id = answer.id;
    meta.textContent = `${answer.id} · reattach: ${answer.stream_url}`;
    if (answer.status === "queued") showQueued(answer.queue_position);
    r.ticker = setInterval(() => showStats(r), 100);
    follow(r, answer.stream_url);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  promptBox.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !sendButton.disabled) {
      event.preventDefault();
      submit();
    }
  });
  stopButton.addEventListener("click", () => {
    if (!run || !run.id) return;
    stopButton.disabled = true;
    statusLine.textContent = "stopping…";
    api(`/v1/chat/completions/${encodeURIComponent(run.id)}/cancel`, { method: "POST" });
  });

  async function loadModels() {
    const chosen = modelSelect.value;
    modelSelect.replaceChildren();
    try {
      const response = await api("/v1/models");
      const body = await response.json();
      for (const model of body.data) modelSelect.add(new Option(model.id, model.id));
      if (chosen) modelSelect.value = chosen;
    } catch (_) {
      // e.g. 401 until the key is typed in: the server then picks its default model
      modelSelect.add(new Option("(server default)", ""));
    }
    app.dataset.models = String(modelSelect.options.length);
  }

  async function checkHealth() {
    const pill = $("health");
    try {
      const response = await fetch("/health");
      const body = await response.json();
      pill.textContent = body.connected ? "dora connected" : "dora disconnected";
      pill.className = "pill " + (body.connected ? "ok" : "bad");
    } catch (_) {
      pill.textContent = "server unreachable";
      pill.className = "pill bad";
    }
  }

  try {
    keyBox.value = sessionStorage.getItem(KEY_ITEM) || "";
  } catch (_) {
    // storage refused (privacy settings): the field still works for this page load
  }
  keyBox.addEventListener("change", () => {
    try {
      if (apiKey()) sessionStorage.setItem(KEY_ITEM, apiKey());
      else sessionStorage.removeItem(KEY_ITEM);
    } catch (_) {
      // as above
    }
    loadModels();
  });

  loadModels();
  checkHealth();
  setInterval(checkHealth, 15000);
})();
