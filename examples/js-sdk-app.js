// ArcGIS Maps SDK for JavaScript 5.x (and 4.x) with @arcgis/core from npm,
// bundled by your build (vite, esbuild, webpack). The page holds no token
// and no API key: the proxy adds the app's credential.
//
// tests/browser/pages/sdk.js does the same (rule, basemap, layer) in Chromium against the
// demo (tests/it/maps.rs): features drawn, nothing sent around the proxy.
import esriConfig from "@arcgis/core/config.js";
import * as urlUtils from "@arcgis/core/core/urlUtils.js";
import Map from "@arcgis/core/Map.js";
import Basemap from "@arcgis/core/Basemap.js";
import MapView from "@arcgis/core/views/MapView.js";
import FeatureLayer from "@arcgis/core/layers/FeatureLayer.js";
import VectorTileLayer from "@arcgis/core/layers/VectorTileLayer.js";

// Self-hosted assets (workers, styles, translations): an absolute URL, so
// that web workers resolve it too. Leave this out to use the ArcGIS CDN.
esriConfig.assetsPath = new URL("/assets", location.href).href;

// One rule per service prefix: every request under urlPrefix, from the page
// or a worker, goes to proxyUrl?<url>. esriConfig.request.proxyUrl alone
// would not do this: it is only a fallback for requests that fail for lack
// of CORS, and ArcGIS Online allows CORS, so the SDK would call the service
// directly, without a token.
urlUtils.addProxyRule({
  urlPrefix: "https://services1.arcgis.com/YOUR_ORG_ID/arcgis/rest/services",
  proxyUrl: "https://proxy.example.com/proxy",
});

// A Basemap Styles style through the mounted route `basemaps`: the proxy
// rewrites the sprite, glyph and tile URLs inside it to its own, so they
// need no rules of their own.
const basemap = new Basemap({
  baseLayers: [
    new VectorTileLayer({ url: "https://proxy.example.com/basemaps/styles/arcgis/navigation" }),
  ],
});

const parks = new FeatureLayer({
  url: "https://services1.arcgis.com/YOUR_ORG_ID/arcgis/rest/services/Parks/FeatureServer/0",
});

new MapView({
  container: "viewDiv",
  map: new Map({ basemap, layers: [parks] }),
  center: [-118.3, 34.07],
  zoom: 11,
});
