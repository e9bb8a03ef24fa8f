// Queries the demo's feature layer through the proxy's mounted path with
// ArcGIS REST JS, as an app would: no token, no authentication, only a
// Referer the proxy allows. Prints the answer as JSON for the Rust test.
import { queryFeatures } from "@esri/arcgis-rest-feature-service";

const proxy = process.argv[2];
if (!proxy) {
  console.error("usage: node query.mjs <proxy base URL>");
  process.exit(2);
}
const result = await queryFeatures({
  url: `${proxy}/features/Parks/FeatureServer/0`,
  where: "1=1",
  outFields: "*",
  // Outside a browser REST JS sends `referer: @esri/arcgis-rest-js` unless
  // the app sets its own (lower-case key); the proxy's allowlist needs a URL.
  headers: { referer: "http://localhost:8080/app.html" },
});
console.log(JSON.stringify(result));
