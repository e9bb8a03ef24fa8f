// MapLibre GL JS with a Basemap Styles style through the proxy's mounted
// route `basemaps` (rewrite_urls = true): the style's sprite, glyph and
// tile URLs come back pointing at the proxy, which adds the token to each.
// The page holds no token and no API key.
//
// tests/browser/pages/maplibre.js does the same in Chromium against
// the demo (tests/it/maps.rs): tiles, sprite and glyphs drawn through the
// proxy, none fetched from the upstream directly.
import * as maplibregl from "maplibre-gl";
import "maplibre-gl/dist/maplibre-gl.css";

new maplibregl.Map({
  container: "map",
  style: "https://proxy.example.com/basemaps/styles/arcgis/navigation",
  center: [-118.3, 34.07],
  zoom: 10,
});
