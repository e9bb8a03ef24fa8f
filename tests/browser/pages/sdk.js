// A public app as the README tells it to be written for @arcgis/core 5.x:
// one proxy rule per service prefix sends every request under it (workers
// included) through the proxy; the page never holds a token.
import esriConfig from "@arcgis/core/config.js";
import * as urlUtils from "@arcgis/core/core/urlUtils.js";
import * as reactiveUtils from "@arcgis/core/core/reactiveUtils.js";
import Map from "@arcgis/core/Map.js";
import MapView from "@arcgis/core/views/MapView.js";
import FeatureLayer from "@arcgis/core/layers/FeatureLayer.js";
import VectorTileLayer from "@arcgis/core/layers/VectorTileLayer.js";
import Basemap from "@arcgis/core/Basemap.js";

const params = new URLSearchParams(location.search);
const proxy = params.get("proxy"); // e.g. http://127.0.0.1:8080
const services = params.get("services"); // e.g. https://gis.example.com/arcgis/rest/services

// Assets (workers, styles, translations) from this site, never a CDN.
esriConfig.assetsPath = new URL("/assets", location.href).href;
if (params.get("rule") !== "0") {
  urlUtils.addProxyRule({ urlPrefix: services, proxyUrl: `${proxy}/proxy` });
}

async function main() {
  const layer = new FeatureLayer({ url: `${services}/Parks/FeatureServer/0` });
  // The basemap: a Basemap Styles style from a mounted route of the proxy
  // (its sprite, glyph and tile URLs already point back at the proxy).
  const basemap = params.get("basemap") === "1"
    ? new Basemap({ baseLayers: [new VectorTileLayer({ url: `${proxy}/basemaps/styles/arcgis/navigation` })] })
    : null;
  // A layer that cannot load (no proxy rule, a refused origin) fails here,
  // not by a view that waits for it forever.
  await layer.load();
  const map = new Map({ basemap, layers: [layer] });
  const view = new MapView({
    container: "view",
    map,
    center: [-118.29, 34.07],
    // No basemap, so no tiling scheme: a scale, not a zoom level.
    scale: 288895,
  });
  window.__debug = () => JSON.stringify({
    ready: view.ready, rs: view.readyState, valid: view._isValid, tsp: view.typeSpecificPreconditionsReady, dfm: view.defaultsFromMap && view.defaultsFromMap.ready, sr: view.spatialReference && view.spatialReference.wkid,
    fatal: view.fatalError && String(view.fatalError), layer: layer.loadStatus,
    layerErr: layer.loadError && String(layer.loadError), w: view.width, h: view.height,
  });
  window.__stage = "view";
  await view.when();
  window.__stage = "layerView";
  const layerView = await view.whenLayerView(layer);
  window.__stage = "updating";
  await reactiveUtils.whenOnce(() => !layerView.updating);
  window.__stage = "count";
  const drawn = await layerView.queryFeatureCount();
  const out = { drawn, loadStatus: layer.loadStatus };
  // A pixel away from the parks: the basemap's colour, if one was drawn.
  const shot = await view.takeScreenshot({ format: "png" });
  const at = (50 * shot.data.width + 50) * 4;
  out.cornerPixel = Array.from(shot.data.data.slice(at, at + 4));
  if (basemap) {
    const vtl = basemap.baseLayers.getItemAt(0);
    const vtlView = await view.whenLayerView(vtl);
    await reactiveUtils.whenOnce(() => !vtlView.updating);
    out.basemap = { loadStatus: vtl.loadStatus, sr: view.spatialReference.wkid };
  }
  return out;
}

main().then(
  (r) => { window.__result = r; },
  (e) => { window.__result = { error: String(e && (e.message || e)), details: JSON.stringify(e && e.details || null) }; },
);
