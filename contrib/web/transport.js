// transport.js - one WebSocket to chatd, reconnected with backoff.
//
// The transport knows nothing of the protocol: it hands each text message
// (one JSON object, docs/protocol.md "WebSocket") up as a parsed object and
// sends objects as one text message each.  It reconnects after any close
// with exponential backoff and jitter (0.5 s doubling to 15 s), reset once
// a connection has stayed open for a while, and at once when the browser
// says it is back online.  Each tab has its own transport: every tab is its
// own connection (and, with durable messaging, its own device).

export function defaultUrl() {
  const q = new URLSearchParams(location.search).get('ws');
  if (q) return q; // ?ws=ws://host:port/chat for development
  const meta = document.querySelector('meta[name="chatd-ws-path"]');
  const path = meta ? meta.content : '/chat';
  return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + path;
}

export class Transport extends EventTarget {
  constructor(url, { minDelay = 500, maxDelay = 15000 } = {}) {
    super();
    this.url = url;
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.delay = minDelay;
    this.ws = null;
    this.stopped = true;
    this.timer = null;
    this.openedAt = 0;
    this.onOnline = () => { if (!this.stopped && !this.ws) this.connectNow(); };
    window.addEventListener('online', this.onOnline);
  }

  get connected() { return !!this.ws && this.ws.readyState === WebSocket.OPEN; }

  start() {
    this.stopped = false;
    if (!this.ws) this.connectNow();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, 'bye');
    this.ws = null;
  }

  // Drop the connection and connect again (e.g. after "logged in elsewhere").
  reconnect() {
    if (this.ws) this.ws.close(1000, 'reconnect');
  }

  connectNow() {
    clearTimeout(this.timer);
    this.timer = null;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.emit('connecting', { url: this.url });
    ws.onopen = () => {
      this.openedAt = Date.now();
      this.emit('open', {});
    };
    ws.onmessage = (ev) => {
      let obj;
      try {
        obj = JSON.parse(ev.data);
      } catch (e) {
        console.warn('chatd sent a message that is not JSON', ev.data);
        return;
      }
      this.emit('message', obj);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      // a connection that lived 10 s was a good one: start over at minDelay
      if (this.openedAt && Date.now() - this.openedAt > 10000) this.delay = this.minDelay;
      this.openedAt = 0;
      this.emit('close', { code: ev.code, reason: ev.reason });
      if (!this.stopped) this.scheduleReconnect();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  scheduleReconnect() {
    const wait = Math.round(this.delay * (0.75 + Math.random() * 0.5));
    this.delay = Math.min(this.maxDelay, this.delay * 2);
    this.emit('retry', { inMs: wait });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connectNow(), wait);
  }

  send(obj) {
    if (!this.connected) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
