// ArcGIS REST JS against a mounted path: no token, no `authentication`.
// Works in a browser as is; in Node, set a referer the allowlist accepts
// (REST JS otherwise sends `referer: @esri/arcgis-rest-js`).
// tests/node/query.mjs is this example, run by the test suite.
import { queryFeatures } from "@esri/arcgis-rest-feature-service";

const result = await queryFeatures({
  url: "https://proxy.example.com/features/Parks/FeatureServer/0",
  where: "1=1",
  outFields: "*",
  headers: { referer: "https://app.example.com/" },
});
console.log(result.features.length, "features");
