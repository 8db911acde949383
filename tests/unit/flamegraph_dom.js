// A DOM just big enough to run profiling/flamegraph.py's script under node.js, for
// tests/unit/test_profiling_flamegraph_js.py. Reads JSON on stdin:
//   {"tree": ELEMENT, "script": "...", "standalone": bool, "actions": [ACTION, ...]}
// where ELEMENT is {"tag", "attrs", "text", "children"} (the SVG as ElementTree parsed it)
// and ACTION is {"click": "ELEMENT-ID"}, {"click_frame": INDEX} (a click on that frame's
// rect), {"prompt": "ANSWER"} (what the next window.prompt returns) or {"key": "KEY",
// "ctrl": bool}. Writes JSON {"initial": SNAPSHOT, "steps": [SNAPSHOT after each action]},
// a snapshot holding every frame's geometry, label and colour and the controls' state.
"use strict";

class Element {
  constructor(spec, parent, doc) {
    this.tagName = spec.tag;
    this.attrs = Object.assign({}, spec.attrs);
    this.ownText = spec.text || "";
    this.parentNode = parent;
    this.ownerDocument = doc;
    this.listeners = {};
    this.children = spec.children.map((c) => new Element(c, this, doc));
  }
  getAttribute(name) { return name in this.attrs ? this.attrs[name] : null; }
  setAttribute(name, value) { this.attrs[name] = String(value); }
  removeAttribute(name) { delete this.attrs[name]; }
  get textContent() { return this.ownText + this.children.map((c) => c.textContent).join(""); }
  set textContent(value) { this.ownText = String(value); this.children = []; }
  *walk() { for (const c of this.children) { yield c; yield* c.walk(); } }
  getElementsByTagName(tag) { return [...this.walk()].filter((e) => e.tagName === tag); }
  addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
}

const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
const document = { listeners: {} };
const root = new Element(input.tree, null, document);
document.documentElement = input.standalone ? root : { tagName: "html" };
document.getElementById = (id) => [root, ...root.walk()].find((e) => e.attrs.id === id) || null;
const answers = [];
const windowListeners = {};
const window = {
  prompt: () => (answers.length ? answers.shift() : null),
  addEventListener: (type, fn) => { (windowListeners[type] = windowListeners[type] || []).push(fn); },
};

new Function("document", "window", input.script)(document, window);

function dispatch(target, type, extra) {
  const event = Object.assign({ target, type, defaultPrevented: false }, extra);
  event.preventDefault = () => { event.defaultPrevented = true; };
  for (let node = target; node; node = node.parentNode) {
    for (const fn of node.listeners[type] || []) fn(event);
  }
}

const frames = root.getElementsByTagName("g").filter((g) => g.attrs.class === "f");
function control(id) {
  const e = document.getElementById(root.attrs.id + "-" + id);
  return { text: e.textContent, visibility: e.getAttribute("visibility") };
}
function snapshot() {
  return {
    frames: frames.map((g) => {
      const rect = g.getElementsByTagName("rect")[0];
      const text = g.getElementsByTagName("text")[0];
      return {
        d: Number(g.attrs["data-d"]), display: g.getAttribute("display"),
        opacity: g.getAttribute("opacity"), x: Number(rect.attrs.x),
        width: Number(rect.attrs.width), fill: rect.attrs.fill, label: text.textContent,
        text_x: Number(text.attrs.x),
      };
    }),
    reset: control("reset"),
    search: control("search"),
    matched: control("matched"),
    keys: Boolean(windowListeners.keydown),
  };
}

const initial = snapshot();
const out = [];
for (const action of input.actions) {
  if ("prompt" in action) answers.push(action.prompt);
  if ("click" in action) dispatch(document.getElementById(action.click), "click");
  if ("click_frame" in action) {
    dispatch(frames[action.click_frame].getElementsByTagName("rect")[0], "click");
  }
  if ("key" in action) {
    const event = { target: root, type: "keydown", key: action.key, ctrlKey: !!action.ctrl };
    event.preventDefault = () => { event.defaultPrevented = true; };
    for (const fn of windowListeners.keydown || []) fn(event);
  }
  out.push(snapshot());
}
process.stdout.write(JSON.stringify({ initial, steps: out }));
