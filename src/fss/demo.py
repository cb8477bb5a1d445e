"""``fss-demo``: a local web page to try a checkpoint on your own images.

Upload one or more support images, draw the object on each (or upload its mask), upload a
query image and get the predicted mask and an overlay back, at the query's size. The page
is plain HTML + JavaScript served by FastAPI (the optional ``demo`` extra:
``pip install 'fss[demo]'``); every prediction goes through :func:`fss.predict`, so the page
gives the same masks as the Python API and ``fss-predict``. See ``docs/demo.md``.

    fss-demo --checkpoint logs/hsnet_synth/runs/<date>/checkpoints/last.ckpt
    # then open http://127.0.0.1:7860
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# name classes imported inside create_app (FastAPI is optional).
import argparse
import base64
import io
import sys
import threading
from typing import Annotated, Any

import numpy as np
from PIL import Image

from fss.utils.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # per file
OVERLAY_COLOUR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_ALPHA = 0.5
INSTALL_HINT = "install the demo extra: pip install 'fss[demo]' (FastAPI, uvicorn, python-multipart)"


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with the pixels of ``mask`` (H, W) {0, 1} tinted red."""
    out = image.astype(np.float32)
    selected = mask.astype(bool)
    out[selected] = (1 - OVERLAY_ALPHA) * out[selected] + OVERLAY_ALPHA * OVERLAY_COLOUR
    return out.round().clip(0, 255).astype(np.uint8)


def png_data_url(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_upload(data: bytes, name: str, what: str) -> Image.Image:
    """The uploaded file ``name`` as a decoded PIL image; ConfigError naming it otherwise."""
    if not data:
        raise ConfigError(f"{what} {name!r} is empty; choose an image file")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ConfigError(f"{what} {name!r} is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ConfigError(f"{what} {name!r} is not an image PIL can read (PNG, JPEG, ...)") from None
    return image


def segment(model: Any, query: Image.Image, supports: list[Image.Image],
            masks: list[Image.Image], device: str = "cpu") -> dict[str, Any]:
    """What the page shows for one query: the mask (0/255 PNG) and the overlay as data
    URLs, the query's size and the share of foreground, and per support the share its
    mask marks."""
    import fss
    from fss.prediction import load_mask

    if not supports:
        raise ConfigError("no support image: add at least one support image and its mask")
    if len(supports) != len(masks):
        raise ConfigError(f"{len(supports)} support images but {len(masks)} masks: give one "
                          "mask per support image")
    # A drawn mask lives on the support's canvas (same size); an uploaded one of another
    # size is stretched to its image by the page, and here too.
    mask = fss.predict(model, query, supports, masks, resize_mask=True, device=device)
    rgb = np.array(query.convert("RGB"))
    support_shares = []
    for index, (image, support_mask) in enumerate(zip(supports, masks, strict=True)):
        marked = load_mask(support_mask, f"support mask {index + 1}")
        support_shares.append({"width": image.width, "height": image.height,
                               "foreground": round(float(marked.mean()), 4)})
    return {
        "width": int(mask.shape[1]),
        "height": int(mask.shape[0]),
        "foreground": round(float(mask.mean()), 4),
        "mask": png_data_url((mask * 255).astype(np.uint8)),
        "overlay": png_data_url(overlay(rgb, mask)),
        "supports": support_shares,
    }


def describe_model(model: Any) -> dict[str, Any]:
    from fss.prediction import backbone_name, input_spec, model_name

    return {"model": model_name(model), "backbone": backbone_name(model),
            "input_size": input_spec(model).size}


def create_app(model: Any, device: str = "cpu") -> Any:
    """The FastAPI application of the page for ``model`` (a model from
    :func:`fss.load_model`): ``GET /`` the page, ``GET /api/model`` what the model is,
    ``POST /api/predict`` (multipart: ``query``, ``supports`` and ``masks``, one mask per
    support) the prediction as JSON; a bad input answers 400 with ``{"error": ...}``."""
    try:
        from fastapi import FastAPI, File, UploadFile
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise ConfigError(f"fss-demo needs FastAPI: {INSTALL_HINT}") from None

    app = FastAPI(title="fss demo", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one prediction at a time: the model is shared
    info = describe_model(model)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("{{MODEL}}", f"{info['model']} ({info['backbone']}), "
                                         f"input {info['input_size']}²")

    @app.get("/api/model")
    def model_info() -> dict[str, Any]:
        return info

    @app.post("/api/predict")
    def predict(query: Annotated[UploadFile, File()],
                supports: Annotated[list[UploadFile], File()],
                masks: Annotated[list[UploadFile], File()]) -> Any:
        try:
            query_image = read_upload(query.file.read(), query.filename or "query", "query image")
            support_images = [read_upload(f.file.read(), f.filename or f"support {i + 1}",
                                          "support image") for i, f in enumerate(supports)]
            mask_images = [read_upload(f.file.read(), f.filename or f"mask {i + 1}",
                                       "support mask") for i, f in enumerate(masks)]
            with lock:
                return segment(model, query_image, support_images, mask_images, device)
        except ConfigError as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fss-demo", description="Serve a local page to segment your own images with a "
        "checkpoint: upload support images, draw their masks, upload a query.")
    parser.add_argument("--checkpoint", required=True,
                        help="a run's .ckpt (self-describing) or an official HSNet / HDMNet file")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    try:
        try:
            import uvicorn
        except ImportError:
            raise ConfigError(f"fss-demo needs uvicorn: {INSTALL_HINT}") from None
        from fss.prediction import load_cached, resolve_device

        resolve_device(args.device)
        model = load_cached(args.checkpoint)
        app = create_app(model, args.device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"fss-demo: {describe_model(model)['model']} from {args.checkpoint}; open "
          f"http://{args.host}:{args.port} (Ctrl+C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fss demo</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 70em; }
  .row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
  .support, .query, .result { border: 1px solid #ccc; border-radius: 6px; padding: .8em; }
  canvas.view { max-width: 24em; max-height: 24em; cursor: crosshair; border: 1px solid #888;
                touch-action: none; display: block; margin-top: .5em; }
  img.out { max-width: 24em; max-height: 24em; border: 1px solid #888; display: block; }
  label { display: block; margin: .3em 0; }
  #status { margin: 1em 0; min-height: 1.5em; }
  #status.error { color: #b00020; }
  button { margin: .3em .3em .3em 0; }
</style>
</head>
<body>
<h1>fss demo</h1>
<p>Model: {{MODEL}}. Add support images of an object class and paint the object on each
(or upload its mask: non-zero pixels are the object), add a query image, press
<b>Segment</b>. The mask comes back at the query's size.</p>
<div class="row" id="supports"></div>
<button id="add-support" type="button">Add a support</button>
<div class="row">
  <div class="query">
    <label>Query image <input type="file" id="query" accept="image/*"></label>
    <img id="query-preview" class="out" alt="">
  </div>
</div>
<button id="segment" type="button">Segment</button>
<div id="status"></div>
<div class="row" id="results" hidden>
  <div class="result"><b>Overlay</b><img id="overlay" class="out" alt="overlay"></div>
  <div class="result"><b>Mask</b><img id="mask" class="out" alt="mask">
    <a id="download" download="mask.png" href="#">download mask.png</a></div>
</div>
<script>
"use strict";
const supports = [];

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error(file.name + " is not an image the browser can read"));
    image.src = URL.createObjectURL(file);
  });
}

function addSupport() {
  const index = supports.length;
  const box = document.createElement("div");
  box.className = "support";
  box.innerHTML = `<b>Support ${index + 1}</b>
    <label>Image <input type="file" class="support-image" accept="image/*"></label>
    <label>Mask file (optional) <input type="file" class="support-mask" accept="image/*"></label>
    <label>Brush <input type="range" class="brush" min="1" max="60" value="12">
      <button type="button" class="erase">Eraser</button>
      <button type="button" class="clear">Clear</button></label>
    <canvas class="view" width="1" height="1"></canvas>`;
  document.getElementById("supports").appendChild(box);
  const view = box.querySelector("canvas.view");
  const entry = { file: null, image: null, mask: document.createElement("canvas"), view,
                  box, erasing: false };
  supports.push(entry);

  const redraw = () => {
    const context = view.getContext("2d");
    context.clearRect(0, 0, view.width, view.height);
    if (entry.image) context.drawImage(entry.image, 0, 0);
    context.globalAlpha = 0.5;
    context.drawImage(entry.mask, 0, 0);
    context.globalAlpha = 1;
  };
  box.querySelector(".support-image").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    try {
      entry.image = await loadImage(file);
    } catch (error) { setStatus(error.message, true); return; }
    entry.file = file;
    for (const canvas of [view, entry.mask]) {
      canvas.width = entry.image.naturalWidth;
      canvas.height = entry.image.naturalHeight;
    }
    redraw();
  });
  box.querySelector(".support-mask").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    if (!entry.image) { setStatus("choose the support image before its mask", true); return; }
    let image;
    try { image = await loadImage(file); } catch (error) { setStatus(error.message, true); return; }
    // Stretched to the support image; non-zero (and not transparent) pixels are the object.
    const scratch = document.createElement("canvas");
    scratch.width = entry.mask.width;
    scratch.height = entry.mask.height;
    const sc = scratch.getContext("2d");
    sc.imageSmoothingEnabled = false;
    sc.drawImage(image, 0, 0, scratch.width, scratch.height);
    const pixels = sc.getImageData(0, 0, scratch.width, scratch.height);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const on = d[i + 3] > 0 && (d[i] || d[i + 1] || d[i + 2]);
      d[i] = on ? 255 : 0; d[i + 1] = 0; d[i + 2] = 0; d[i + 3] = on ? 255 : 0;
    }
    entry.mask.getContext("2d").putImageData(pixels, 0, 0);
    box.dataset.mask = "uploaded";
    redraw();
  });
  box.querySelector(".erase").addEventListener("click", (event) => {
    entry.erasing = !entry.erasing;
    event.target.textContent = entry.erasing ? "Brush" : "Eraser";
  });
  box.querySelector(".clear").addEventListener("click", () => {
    entry.mask.getContext("2d").clearRect(0, 0, entry.mask.width, entry.mask.height);
    redraw();
  });

  let last = null;
  const point = (event) => {
    const rect = view.getBoundingClientRect();
    return [(event.clientX - rect.left) * view.width / rect.width,
            (event.clientY - rect.top) * view.height / rect.height];
  };
  const paint = (from, to) => {
    const context = entry.mask.getContext("2d");
    const scale = view.width / view.getBoundingClientRect().width;
    context.globalCompositeOperation = entry.erasing ? "destination-out" : "source-over";
    context.strokeStyle = "rgb(255, 0, 0)";
    context.lineCap = "round";
    context.lineJoin = "round";
    context.lineWidth = Number(box.querySelector(".brush").value) * scale;
    context.beginPath();
    context.moveTo(from[0], from[1]);
    context.lineTo(to[0] + 0.01, to[1]);
    context.stroke();
    context.globalCompositeOperation = "source-over";
    redraw();
  };
  view.addEventListener("pointerdown", (event) => {
    if (!entry.image) { setStatus("choose the support image first", true); return; }
    view.setPointerCapture(event.pointerId);
    last = point(event);
    paint(last, last);
  });
  view.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const next = point(event);
    paint(last, next);
    last = next;
  });
  for (const name of ["pointerup", "pointercancel"]) {
    view.addEventListener(name, () => { last = null; });
  }
}

function maskBlob(entry) {
  // 0/255 greyscale-looking PNG at the support image's size: painted pixels are 255.
  const out = document.createElement("canvas");
  out.width = entry.mask.width;
  out.height = entry.mask.height;
  const source = entry.mask.getContext("2d").getImageData(0, 0, out.width, out.height).data;
  const context = out.getContext("2d");
  const pixels = context.createImageData(out.width, out.height);
  let count = 0;
  for (let i = 0; i < source.length; i += 4) {
    const on = source[i + 3] >= 128 ? 255 : 0;
    if (on) count += 1;
    pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = on;
    pixels.data[i + 3] = 255;
  }
  context.putImageData(pixels, 0, 0);
  return new Promise((resolve) => out.toBlob((blob) => resolve({ blob, count }), "image/png"));
}

function setStatus(text, error = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

async function runSegment() {
  const query = document.getElementById("query").files[0];
  const ready = supports.filter((entry) => entry.file);
  if (!ready.length) { setStatus("add a support image and mark the object on it", true); return; }
  if (!query) { setStatus("choose a query image", true); return; }
  const form = new FormData();
  form.append("query", query, query.name);
  for (const [index, entry] of ready.entries()) {
    const { blob, count } = await maskBlob(entry);
    if (!count) { setStatus(`support ${index + 1}: paint the object (or upload its mask) first`, true); return; }
    form.append("supports", entry.file, entry.file.name);
    form.append("masks", blob, `mask${index + 1}.png`);
  }
  setStatus("segmenting ...");
  document.body.dataset.state = "busy";
  try {
    const response = await fetch("api/predict", { method: "POST", body: form });
    const result = await response.json();
    if (!response.ok) { setStatus(result.error || response.statusText, true); return; }
    document.getElementById("overlay").src = result.overlay;
    document.getElementById("mask").src = result.mask;
    document.getElementById("download").href = result.mask;
    document.getElementById("results").hidden = false;
    window.lastResult = result;
    setStatus(`mask ${result.width}×${result.height}, ` +
              `${(100 * result.foreground).toFixed(1)} % foreground`);
  } catch (error) {
    setStatus("the server did not answer: " + error.message, true);
  } finally {
    document.body.dataset.state = "done";
  }
}

document.getElementById("add-support").addEventListener("click", addSupport);
document.getElementById("segment").addEventListener("click", runSegment);
document.getElementById("query").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) document.getElementById("query-preview").src = URL.createObjectURL(file);
});
addSupport();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
