// A Basemap Styles basemap in MapLibre GL JS, loaded from a mounted route
// of the proxy: the style, then its sprite, glyphs and tiles through the
// URLs the proxy rewrote into it. The page holds no token.
import * as maplibregl from "maplibre-gl";

const params = new URLSearchParams(location.search);
const proxy = params.get("proxy");
const errors = [];

const map = new maplibregl.Map({
  container: "map",
  style: `${proxy}/basemaps/styles/arcgis/navigation`,
  center: [-118.29, 34.07],
  zoom: 10,
  // Keep the frame so its pixels can be read back below.
  canvasContextAttributes: { preserveDrawingBuffer: true },
  attributionControl: false,
});
map.on("error", (e) => errors.push(String((e.error && e.error.message) || e.error || e)));

// The colour of the pixel at the centre of the drawn map.
function centrePixel() {
  const gl = map.getCanvas().getContext("webgl2") || map.getCanvas().getContext("webgl");
  const px = new Uint8Array(4);
  gl.readPixels(gl.drawingBufferWidth >> 1, gl.drawingBufferHeight >> 1, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, px);
  return Array.from(px);
}

function finish() {
  const result = { errors, rendered: {} };
  try {
    for (const f of map.queryRenderedFeatures()) {
      result.rendered[f.layer.id] = (result.rendered[f.layer.id] || 0) + 1;
    }
    result.tilesLoaded = map.areTilesLoaded();
    result.sprite = map.hasImage("park");
    result.pixel = centrePixel();
  } catch (e) {
    // No style: nothing to ask the map about.
    errors.push(`finish: ${e.message || e}`);
  }
  window.__result = result;
}

map.once("idle", finish);
map.once("error", () => setTimeout(() => { if (!window.__result) finish(); }, 3000));
