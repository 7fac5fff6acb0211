// tinyinfer's chat page: a client of the server's OpenAI-compatible API, in plain JavaScript.
//
// The server keeps no conversation: each turn sends the whole history as `messages`, and the
// engine's prefix cache finds the tokens it has already computed for the earlier turns. The
// answer comes back as server-sent events (one `data: {...}` chunk per piece of text, then
// `data: [DONE]`), read here with fetch and a stream reader: the browser's EventSource cannot
// send a POST with a body. Stopping aborts the fetch; the server sees the connection close and
// aborts the request, freeing its KV blocks.
"use strict";

const ui = {
  model: document.getElementById("model"),
  newChat: document.getElementById("new-chat"),
  conversation: document.getElementById("conversation"),
  error: document.getElementById("error"),
  composer: document.getElementById("composer"),
  message: document.getElementById("message"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  temperature: document.getElementById("temperature"),
  maxTokens: document.getElementById("max-tokens"),
  apiKey: document.getElementById("api-key"),
  stats: document.getElementById("stats"),
};

const API_KEY_STORAGE = "tinyinfer.apiKey"; // localStorage entry: the key survives a reload

let messages = [];      // the conversation so far: [{role: "user" | "assistant", content}]
let modelName = null;   // the id GET /v1/models reports, sent as `model`
let inFlight = null;    // the AbortController of the request being answered, or null

// ---- talking to the server --------------------------------------------------------------

// Every request's headers: JSON, and the API key as a bearer token when one is set.
function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  return headers;
}

// The words of a failed response. The server answers errors the way OpenAI does,
// {"error": {"message", "type", "param", "code"}}, with a 4xx or 5xx status.
async function errorMessage(response) {
  const body = await response.text();
  let message = body.trim() || response.statusText;
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error && parsed.error.message) message = parsed.error.message;
  } catch (_) {
    // not JSON (a proxy's page, say): show the text as it is
  }
  const hint = response.status === 401 ? " (the server's key goes in the API key field below)" : "";
  return `${response.status}: ${message}${hint}`;
}

// Ask the server which model it serves and show its name. Without a key (or with a wrong
// one) the server refuses, and the error says so.
async function loadModelName() {
  try {
    const response = await fetch("/v1/models", { headers: requestHeaders() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const list = await response.json();
    modelName = list.data && list.data.length ? list.data[0].id : null;
    ui.model.textContent = modelName || "(no model)";
    hideError();
  } catch (error) {
    modelName = null;
    ui.model.textContent = "(model unknown)";
    showError(`Could not list the models: ${error.message}`);
  }
}

// Server-sent events from a streaming response, one `data` payload (a string) at a time.
// An event is a few "field: value" lines ended by a blank line; only `data` lines matter here.
// The network cuts the stream wherever it likes, so text is buffered until an event is whole.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")) // "data: x" and "data:x" are the same
        .join("\n");
      if (data) yield data;
    }
  }
}

// Send the conversation (`history`) and stream the answer into `turn`, which counts the pieces
// as they arrive. Returns the whole answer: its text, why it ended (finish_reason: "stop" or
// "length"), the token usage, and whether the stream ended properly with [DONE]. Throws an
// AbortError when the user presses Stop, and an Error with the server's words when refused.
async function streamAnswer(history, turn, signal) {
  const body = {
    messages: history, // the whole conversation, ending with the user's new message
    stream: true,
    stream_options: { include_usage: true }, // the last chunk carries the token counts
  };
  if (modelName) body.model = modelName;
  const temperature = parseFloat(ui.temperature.value);
  if (!Number.isNaN(temperature)) body.temperature = temperature; // empty: the server's default
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;

  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: requestHeaders(),
    body: JSON.stringify(body),
    signal, // aborting it closes the connection: the server aborts the request
  });
  if (!response.ok) throw new Error(await errorMessage(response));

  const result = { text: "", finishReason: null, usage: null, done: false };
  for await (const data of serverSentEvents(response)) {
    if (data === "[DONE]") {
      result.done = true;
      break;
    }
    const chunk = JSON.parse(data); // a chat.completion.chunk
    if (chunk.error) throw new Error(chunk.error.message); // an error after the stream began
    const choice = chunk.choices && chunk.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      result.text += choice.delta.content;
      turn.pieces += 1;
      if (turn.pieces === 1) turn.firstPieceAt = performance.now();
      setTurnText(turn, result.text);
    }
    if (choice && choice.finish_reason) result.finishReason = choice.finish_reason;
    if (chunk.usage) result.usage = chunk.usage; // the last chunk, when include_usage is set
  }
  return result;
}

// ---- one turn of the conversation ---------------------------------------------------------

async function send(text) {
  hideError();
  const history = messages; // "New chat" starts a new array; a late answer goes to the old one
  history.push({ role: "user", content: text });
  const userTurn = addTurn("user", text);
  const turn = addTurn("assistant", "");
  turn.element.classList.add("streaming");
  turn.startedAt = performance.now();
  turn.pieces = 0;
  ui.stats.textContent = "";
  setStreaming(new AbortController());

  try {
    if (!modelName) await loadModelName(); // the request must name the model (a key set since?)
    const result = await streamAnswer(history, turn, inFlight.signal);
    history.push({ role: "assistant", content: result.text });
    if (!result.done) addNote(turn, "the stream ended early: the server closed the connection");
    else if (result.finishReason === "length") addNote(turn, "cut at max tokens");
    showStats(turn, result.usage);
  } catch (error) {
    if (error.name === "AbortError") {
      // Stop: keep what arrived, as the model's (short) answer.
      const partial = turn.text.textContent;
      history.push({ role: "assistant", content: partial });
      turn.element.classList.add("stopped");
      addNote(turn, "stopped");
      showStats(turn, null); // no usage chunk came: the pieces are counted
    } else {
      // Refused or failed: take the turn back and return the text to the message box, so
      // the user can fix what the error names (the key, a setting) and send it again.
      history.pop();
      userTurn.element.remove();
      turn.element.remove();
      if (!ui.message.value) ui.message.value = text;
      const reason = error instanceof TypeError ? `cannot reach the server (${error.message})` : error.message;
      showError(reason);
    }
  } finally {
    turn.element.classList.remove("streaming");
    setStreaming(null);
  }
}

// ---- the page -----------------------------------------------------------------------------

// A turn on the page: {element, text} where text is the element holding its words (an
// answer's turn also keeps its timing: startedAt, firstPieceAt, pieces).
function addTurn(role, text) {
  const element = document.createElement("div");
  element.className = `turn ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "you" : modelName || "assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text; // textContent, never innerHTML: the model's output is not markup
  element.append(label, body);
  ui.conversation.append(element);
  scrollToEnd();
  return { element, text: body };
}

function setTurnText(turn, text) {
  turn.text.textContent = text;
  scrollToEnd();
}

function addNote(turn, note) {
  const element = document.createElement("div");
  element.className = "note";
  element.textContent = note;
  turn.element.append(element);
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

// Speed as the user saw it: the time to the first piece, then the rate after it. The
// usage chunk counts tokens; without it (a stopped answer) the text pieces are counted, and a
// piece is about a token (a token that ends inside a UTF-8 character waits for the next).
function showStats(turn, usage) {
  const [count, unit] = usage ? [usage.completion_tokens, "tokens"] : [turn.pieces, "pieces"];
  const parts = [`${count} ${unit}`];
  if (turn.firstPieceAt) {
    parts.push(`first after ${Math.round(turn.firstPieceAt - turn.startedAt)} ms`);
    const seconds = (performance.now() - turn.firstPieceAt) / 1000;
    if (count > 1 && seconds > 0) parts.push(`${((count - 1) / seconds).toFixed(1)} ${unit}/s`);
  }
  ui.stats.textContent = parts.join(" · ");
}

// While an answer streams: Send is off, Stop is on, and <body data-state> says "streaming".
function setStreaming(controller) {
  inFlight = controller;
  ui.send.disabled = controller !== null;
  ui.stop.disabled = controller === null;
  document.body.dataset.state = controller ? "streaming" : "idle";
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// ---- wiring -------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault(); // no page load: the answer streams in place
  const text = ui.message.value.trim();
  if (!text || inFlight) return;
  ui.message.value = "";
  send(text);
});

// Enter sends; Shift+Enter is a new line (and Enter that confirms an input method's
// composition, as for Chinese or Japanese, is not a send).
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => {
  if (inFlight) inFlight.abort();
});

ui.newChat.addEventListener("click", () => {
  if (inFlight) inFlight.abort();
  messages = [];
  ui.conversation.replaceChildren();
  ui.stats.textContent = "";
  hideError();
  ui.message.focus();
});

// The key is kept in this browser's localStorage (never sent anywhere but this server);
// a new key asks for the model list again, which is how a wrong key shows at once.
ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKey.addEventListener("change", () => {
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(API_KEY_STORAGE, key);
  else localStorage.removeItem(API_KEY_STORAGE);
  loadModelName();
});

loadModelName();
