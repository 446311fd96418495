// Audio in the browser: decode anything the browser plays, resample to 16 kHz mono with an
// OfflineAudioContext, encode 16-bit PCM WAV, so the server needs no decoder for it.  And the
// microphone recorder: processing off, device rate, converted the same way after recording.

export const RATE = 16000;

// Formats the server decodes itself (soundfile): sent untouched, so the result is exactly what
// the API gives for the same file.  Anything else is converted here first.
const SERVER_READS = /\.(wav|wave|flac|ogg|oga|opus|mp3|aif|aiff)$/i;
export const serverReads = (file) => SERVER_READS.test(file.name || "");

export async function toWav16k(blob) {
  const data = await blob.arrayBuffer();
  const decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(data);
  const frames = Math.max(1, Math.ceil(decoded.duration * RATE));
  const ctx = new OfflineAudioContext(1, frames, RATE); // renders the mono down-mix at 16 kHz
  const src = ctx.createBufferSource();
  src.buffer = decoded;
  src.connect(ctx.destination);
  src.start();
  const rendered = await ctx.startRendering();
  return new Blob([encodeWav(rendered.getChannelData(0), RATE)], { type: "audio/wav" });
}

export function encodeWav(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const text = (off, s) => { for (let i = 0; i < s.length; i++) v.setUint8(off + i, s.charCodeAt(i)); };
  text(0, "RIFF");
  v.setUint32(4, 36 + samples.length * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  text(36, "data");
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0, off = 44; i < samples.length; i++, off += 2) {
    const x = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(off, x < 0 ? x * 0x8000 : x * 0x7fff, true);
  }
  return buf;
}

// Processing that changes level and prosody is off: it would alter what the model hears.
export const CONSTRAINTS = {
  audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
};

export class Recorder {
  // onTick({level: 0..1 peak, seconds})
  async start(onTick) {
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      throw new Error("This browser cannot record audio here (recording needs https or localhost).");
    }
    this.stream = await navigator.mediaDevices.getUserMedia(CONSTRAINTS);
    this.settings = this.stream.getAudioTracks()[0].getSettings();
    this.ctx = new AudioContext(); // the device rate: Firefox refuses mixing rates in one graph
    const analyser = this.ctx.createAnalyser();
    analyser.fftSize = 2048;
    this.ctx.createMediaStreamSource(this.stream).connect(analyser);
    this.chunks = [];
    this.rec = new MediaRecorder(this.stream, { audioBitsPerSecond: 256000 });
    this.rec.ondataavailable = (e) => { if (e.data.size) this.chunks.push(e.data); };
    this.stopped = new Promise((resolve) => { this.rec.onstop = resolve; });
    this.rec.start(250);
    this.t0 = performance.now();
    const frame = new Float32Array(analyser.fftSize);
    this.timer = setInterval(() => {
      analyser.getFloatTimeDomainData(frame);
      let peak = 0;
      for (const x of frame) peak = Math.max(peak, Math.abs(x));
      onTick({ level: peak, seconds: this.seconds() });
    }, 100);
  }

  seconds() {
    return (performance.now() - this.t0) / 1000;
  }

  // Stops and returns the recording as 16 kHz mono 16-bit WAV.
  async stop() {
    const seconds = this.seconds();
    this.rec.stop();
    await this.stopped;
    this.release();
    const blob = new Blob(this.chunks, { type: this.rec.mimeType || "audio/webm" });
    return { wav: await toWav16k(blob), seconds };
  }

  release() {
    clearInterval(this.timer);
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) this.ctx.close();
    this.stream = null;
    this.ctx = null;
  }
}
