// The playground: the service's public HTTP API from a browser, no build step. POST /synthesize streams raw PCM
// (s16le mono, its rate in X-Sample-Rate); each piece is decoded as it arrives and scheduled on a Web Audio clock, so
// playback starts with the first chunk. GET /model_info, /v1/models and POST /add_speaker fill in and change the
// choices. With an API key the requests carry `Authorization: Bearer <key>`.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "cosyapp.apiKey";
const RECORDING = "__recording__";

const page = {
  recording: null,  // Blob: the uploaded or recorded voice
  recorder: null,   // the microphone capture in progress
  playback: null,   // the synthesis being played
};

function setStatus(text, state) {
  $("status").textContent = text;
  if (state) document.body.dataset.state = state;
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  const body = await response.text();
  try {
    const parsed = JSON.parse(body);
    return parsed.detail || (parsed.error && parsed.error.message) || body;
  } catch (e) {
    return body || response.statusText;
  }
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await errorText(response)}`);
  return response.json();
}

// ---- choices ----------------------------------------------------------------------------------

function fillSelect(select, options, keep) {
  const previous = keep ? select.value : null;
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
  if (previous !== null && options.some(([value]) => value === previous)) select.value = previous;
}

async function connect() {
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  try {
    const [info, models] = await Promise.all([getJson("/model_info"), getJson("/v1/models")]);
    $("model").textContent = `${info.model_type} at ${info.sample_rate} Hz · modes: ${info.modes.join(", ")}`;
    fillSelect($("backend"), models.data.map((model) => [model.id, model.id]), true);
    const voices = [["", "default voice"], ...info.speakers.map((id) => [id, `speaker: ${id}`]),
                    [RECORDING, "recording (upload or record below)"]];
    fillSelect($("voice"), voices, true);
    $("instruction").placeholder = info.default_instruction || $("instruction").placeholder;
    setStatus("ready", "idle");
  } catch (e) {
    setStatus(`${e.message}${/401/.test(e.message) ? " (enter the API key above)" : ""}`, "error");
  }
}

// ---- the request ------------------------------------------------------------------------------

function synthesisForm() {
  const form = new FormData();
  form.append("text", $("text").value);
  form.append("format", "pcm");
  form.append("backend", $("backend").value);
  if ($("sample-rate").value) form.append("sample_rate", $("sample-rate").value);
  const voice = $("voice").value;
  if (voice === RECORDING) {
    if (!page.recording) throw new Error("upload or record a voice first");
    form.append("prompt_wav", page.recording, page.recording.name || "voice.wav");
  } else if (voice) {
    form.append("speaker", voice);
  }
  const mode = $("mode").value;
  const instruction = $("instruction").value.trim();
  const transcript = $("prompt-text").value.trim();
  if (mode === "instruct2" || (mode === "auto" && instruction)) {
    if (!instruction) throw new Error("instruct2 needs an instruction");
    form.append("instruction", instruction);
  }
  if ((mode === "zero_shot" || mode === "auto") && transcript && voice === RECORDING) {
    form.append("prompt_text", transcript);
  }
  if (mode === "zero_shot" && voice === RECORDING && !transcript) {
    throw new Error("zero-shot needs the recording's transcript");
  }
  return form;
}

// ---- streamed playback ------------------------------------------------------------------------

class Playback {
  constructor() {
    this.context = new AudioContext();
    this.controller = new AbortController();
    this.nextTime = 0;
    this.carry = null;  // an odd byte left over from the last piece (a sample split between two pieces)
    this.bytes = 0;
    this.samples = 0;
    this.rate = 0;
    this.started = performance.now();
    this.firstAudio = null;
  }

  async run(form) {
    const response = await fetch("/synthesize", { method: "POST", body: form, headers: headers(),
                                                   signal: this.controller.signal });
    if (!response.ok) throw new Error(`${response.status} ${await errorText(response)}`);
    this.rate = Number(response.headers.get("X-Sample-Rate"));
    $("rate").textContent = this.rate;
    const reader = response.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      this.play(value);
    }
    this.finished = performance.now();
    this.showStats();
  }

  play(piece) {
    if (this.firstAudio === null) {
      this.firstAudio = performance.now() - this.started;
      $("latency").textContent = `${Math.round(this.firstAudio)} ms`;
    }
    this.bytes += piece.length;
    let data = piece;
    if (this.carry !== null) {
      data = new Uint8Array(piece.length + 1);
      data[0] = this.carry;
      data.set(piece, 1);
      this.carry = null;
    }
    if (data.length % 2) {
      this.carry = data[data.length - 1];
      data = data.subarray(0, data.length - 1);
    }
    if (!data.length) return;
    const view = new DataView(data.buffer, data.byteOffset, data.length);
    const buffer = this.context.createBuffer(1, data.length / 2, this.rate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < channel.length; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    // Pieces play back to back; the first waits 50 ms so that a slightly late second piece does not leave a gap.
    this.nextTime = Math.max(this.nextTime, this.context.currentTime + 0.05);
    source.start(this.nextTime);
    this.nextTime += buffer.duration;
    this.samples += channel.length;
    this.showStats();
  }

  showStats() {
    $("bytes").textContent = this.bytes;
    $("samples").textContent = this.samples;
    const seconds = this.samples / this.rate;
    $("duration").textContent = `${seconds.toFixed(2)} s`;
    if (this.finished && seconds > 0) {
      $("rtf").textContent = (((this.finished - this.started) / 1000) / seconds).toFixed(3);
    }
  }

  stop() {
    this.controller.abort();
    this.context.close();
  }
}

async function play() {
  if (page.playback) page.playback.stop();
  for (const id of ["latency", "rtf", "duration", "rate"]) $(id).textContent = "–";
  let form;
  try {
    form = synthesisForm();
  } catch (e) {
    setStatus(e.message, "error");
    return;
  }
  const playback = page.playback = new Playback();
  $("stop").disabled = false;
  setStatus("synthesizing…", "playing");
  try {
    await playback.run(form);
    setStatus(`done: ${playback.samples} samples in ${playback.bytes} bytes`, "done");
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped", "idle");
    else setStatus(e.message, "error");
  } finally {
    $("stop").disabled = true;
  }
}

// ---- the voice recording ----------------------------------------------------------------------

function wavBlob(chunks, rate) {
  const length = chunks.reduce((sum, chunk) => sum + chunk.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * length));
  const text = (offset, value) => [...value].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * length, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * length, true);
  let offset = 44;
  for (const chunk of chunks) {
    for (const sample of chunk) {
      view.setInt16(offset, Math.max(-1, Math.min(1, sample)) * 32767, true);
      offset += 2;
    }
  }
  return new Blob([view], { type: "audio/wav" });
}

async function toggleRecording() {
  if (page.recorder) {
    const { context, stream, chunks } = page.recorder;
    page.recorder = null;
    stream.getTracks().forEach((track) => track.stop());
    page.recording = wavBlob(chunks, context.sampleRate);
    await context.close();
    $("record").textContent = "● Record";
    $("recording-status").textContent = `recorded ${(page.recording.size / 2 / context.sampleRate).toFixed(1)} s`;
    $("voice").value = RECORDING;
    return;
  }
  try {
    // Raw samples through Web Audio, sent as WAV: the service reads WAV, FLAC, OGG and MP3, not the browser's WebM.
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const context = new AudioContext();
    const source = context.createMediaStreamSource(stream);
    const tap = context.createScriptProcessor(4096, 1, 1);
    const chunks = [];
    tap.onaudioprocess = (event) => chunks.push(new Float32Array(event.inputBuffer.getChannelData(0)));
    source.connect(tap);
    tap.connect(context.destination);
    page.recorder = { context, stream, chunks };
    $("record").textContent = "■ Stop recording";
    $("recording-status").textContent = "recording…";
  } catch (e) {
    setStatus(`cannot record: ${e.message}`, "error");
  }
}

function chooseFile() {
  const file = $("voice-file").files[0];
  if (!file) return;
  page.recording = file;
  $("recording-status").textContent = file.name;
  $("voice").value = RECORDING;
}

async function register() {
  const id = $("speaker-id").value.trim();
  if (!id || !page.recording) {
    setStatus("a speaker needs an id and a recording (upload or record one)", "error");
    return;
  }
  const form = new FormData();
  form.append("name", id);
  form.append("audio_file", page.recording, page.recording.name || "voice.wav");
  if ($("prompt-text").value.trim()) form.append("reference_text", $("prompt-text").value.trim());
  const response = await fetch("/add_speaker", { method: "POST", body: form, headers: headers() });
  if (!response.ok) {
    setStatus(`register: ${response.status} ${await errorText(response)}`, "error");
    return;
  }
  await connect();
  $("voice").value = id;
  setStatus(`speaker ${id} registered`, "idle");
}

$("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("connect").addEventListener("click", connect);
$("play").addEventListener("click", play);
$("stop").addEventListener("click", () => page.playback && page.playback.stop());
$("record").addEventListener("click", toggleRecording);
$("voice-file").addEventListener("change", chooseFile);
$("register").addEventListener("click", register);
connect();
