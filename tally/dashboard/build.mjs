// Copies the charting library from node_modules into static/vendor, where the worker serves it from.
// Run by `make dashboard-assets` after `npm ci`; the result is committed, so running tally needs no Node.
// The source-map comment is dropped (the map is not shipped); the licenses of chart.js and of the colour
// helper bundled into its UMD file are copied beside it.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";

const pkg = JSON.parse(readFileSync("node_modules/chart.js/package.json", "utf8"));
const js = readFileSync("node_modules/chart.js/dist/chart.umd.min.js", "utf8")
  .replace(/\n\/\/# sourceMappingURL=\S+\s*$/, "\n");
mkdirSync("static/vendor", { recursive: true });
writeFileSync("static/vendor/chart.umd.min.js", js);
copyFileSync("node_modules/chart.js/LICENSE.md", "static/vendor/chart.js.LICENSE.md");
copyFileSync("node_modules/@kurkle/color/LICENSE.md", "static/vendor/kurkle-color.LICENSE.md");
console.log(`static/vendor: chart.js ${pkg.version} (${pkg.license})`);
