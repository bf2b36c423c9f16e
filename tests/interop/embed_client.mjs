// An independent gRPC client of the Embed service, written against protos/ only.
// Usage: node embed_client.mjs HOST:PORT IMAGES.json
// IMAGES.json: [{"id": "...", "path": "..."}]. Prints one JSON document with
// every pooling's unary answers, the stream's answers and the health status.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const [address, listFile] = process.argv.slice(2);

const definition = protoLoader.loadSync("protos/dinov2/v1/embed.proto", {
  includeDirs: [root],
  enums: String,
  longs: Number,
  defaults: true,
});
const healthDefinition = protoLoader.loadSync(
  path.join(here, "health.proto"),
  { enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).dinov2.v1;
const healthPkg = grpc.loadPackageDefinition(healthDefinition).grpc.health.v1;
const creds = grpc.credentials.createInsecure();
const embed = new v1.Embed(address, creds);
const health = new healthPkg.Health(address, creds);

const images = JSON.parse(fs.readFileSync(listFile, "utf8")).map((item) => ({
  id: item.id,
  data: fs.readFileSync(item.path),
}));

const unary = (method, client, request) =>
  new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 60000);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });

const simplify = (response) => ({
  error: response.error ? { code: response.error.code, message: response.error.message } : null,
  embeddings: response.embeddings.map((e) => ({
    id: e.id,
    values: e.values,
    error: e.error ? { code: e.error.code, message: e.error.message } : null,
  })),
});

const result = { unary: {}, stream: [], info: null, health: null };
result.info = await unary("Info", embed, {});
for (const pooling of ["POOLING_CLS", "POOLING_MEAN", "POOLING_CLS_MEAN"]) {
  result.unary[pooling] = simplify(await unary("Embed", embed, { images, pooling, normalize: false }));
}

result.stream = await new Promise((resolve, reject) => {
  const answers = [];
  const call = embed.EmbedStream({ deadline: new Date(Date.now() + 60000) });
  call.on("data", (response) => answers.push(simplify(response)));
  call.on("error", reject);
  call.on("end", () => resolve(answers));
  for (const image of images) call.write({ images: [image], pooling: "POOLING_CLS" });
  call.write({ images: [] });
  call.end();
});

result.health = (await unary("Check", health, { service: "dinov2.v1.Embed" })).status;
process.stdout.write(JSON.stringify(result));
embed.close();
health.close();
