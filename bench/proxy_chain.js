// proxy-chain (Apify's Node.js proxy) as a benchmark peer: listen on
// 127.0.0.1:PORT and forward HTTP and CONNECT to the parent with credentials.
//     node bench/proxy_chain.js PORT http://USER:PASS@127.0.0.1:PARENT
const ProxyChain = require("proxy-chain");

const [port, upstream] = process.argv.slice(2);
const server = new ProxyChain.Server({
  port: Number(port),
  host: "127.0.0.1",
  verbose: false,
  prepareRequestFunction: () => ({ upstreamProxyUrl: upstream }),
});
server.listen();
process.on("SIGTERM", () => server.close(true, () => process.exit(0)));
