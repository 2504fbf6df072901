// The channel's target and service config for one server or several: the same rules as the Python client
// (clients/python/sieve/_channel.py).
//
// Several servers: a list of "IP:port" (or one string of them, comma-separated) becomes one gRPC target,
// `ipv4:10.0.0.1:50051,10.0.0.2:50051` (or `ipv6:[::1]:50051,...`), and the service config picks gRPC's
// round_robin load balancing, which spreads calls over the servers that are up and stops sending to one whose
// connection fails. Servers known by name: give one DNS name that resolves to all of them (e.g. a headless
// Kubernetes service): grpc-js resolves it to every address, spreads the calls the same way and resolves it
// again when connections fail (a list of names is refused, not resolved once here, which would go stale).
// With several addresses, a call that fails with UNAVAILABLE is also retried at once by grpc-js itself (the
// service config's retryPolicy: one attempt per address, at most 5) on another server, for the idempotent
// methods only; the client's own retries (retry.ts) come on top as before.
import { isIP } from "node:net";
import { IDEMPOTENT } from "./retry";

const GRPC_SCHEMES = ["ipv4:", "ipv6:", "dns:", "unix:"];

/** The gRPC target for `address` and how many addresses it names. */
export function channelTarget(address: string | readonly string[]): { target: string; count: number } {
  if (typeof address === "string" && GRPC_SCHEMES.some((scheme) => address.startsWith(scheme))) {
    return { target: address, count: address.startsWith("ipv") ? address.split(",").length : 1 };
  }
  const items = typeof address === "string" ? [address] : [...address];
  const found = items.flatMap((item) => item.split(",")).map((part) => part.trim()).filter(Boolean);
  if (found.length === 0) throw new TypeError("no server address given");
  if (found.length === 1) return { target: found[0], count: 1 };
  const versions = new Set<number>();
  const literals = found.map((item) => {
    const at = item.lastIndexOf(":");
    const host = item.slice(0, at).replace(/^\[|\]$/g, "");
    const port = item.slice(at + 1);
    const version = at > 0 && /^\d+$/.test(port) ? isIP(host) : 0;
    if (version === 0) {
      throw new TypeError(
        `several addresses must be IP:port, got ${JSON.stringify(item)}; for servers known by name give one DNS ` +
          "name that resolves to all of them",
      );
    }
    versions.add(version);
    return version === 6 ? `[${host}]:${port}` : `${host}:${port}`;
  });
  if (versions.size !== 1) {
    throw new TypeError(`${found.join(", ")}: give IPv4 addresses only or IPv6 only (one gRPC target cannot mix them)`);
  }
  return { target: `ipv${[...versions][0]}:${literals.join(",")}`, count: literals.length };
}

/** round_robin over the target's addresses; with several, grpc-js's own retry of UNAVAILABLE (one attempt per
 * address, at most 5, a short backoff) for the idempotent methods. */
export function serviceConfig(addressCount: number): string {
  const config: Record<string, unknown> = { loadBalancingConfig: [{ round_robin: {} }] };
  if (addressCount > 1) {
    const name = [...IDEMPOTENT].sort().map((method) => {
      const [service, rpc] = method.split("/");
      return { service: `sieve.v1.${service}`, method: rpc };
    });
    const retryPolicy = {
      maxAttempts: Math.min(addressCount, 5),
      initialBackoff: "0.01s",
      maxBackoff: "0.1s",
      backoffMultiplier: 2,
      retryableStatusCodes: ["UNAVAILABLE"],
    };
    config.methodConfig = [{ name, retryPolicy }];
  }
  return JSON.stringify(config);
}
