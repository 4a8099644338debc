import assert from "node:assert/strict";
import { test } from "node:test";
import { KaizenClient, KaizenError } from "../src/client";

test("the token goes in the header and server errors surface their message", async () => {
  let seen: RequestInit | undefined;
  const fake = (async (_url: string, init: RequestInit) => {
    seen = init;
    return new Response(JSON.stringify({ error: { message: "Invalid or revoked token." } }), { status: 401 });
  }) as unknown as typeof fetch;
  const client = new KaizenClient("http://kaizen.test/", "kz_secret", fake);
  await assert.rejects(client.postJson("POST", "/v1/events", { events: [] }), (err: KaizenError) => {
    assert.equal(err.status, 401);
    assert.equal(err.message, "Invalid or revoked token.");
    return true;
  });
  assert.equal((seen!.headers as Record<string, string>).Authorization, "Bearer kz_secret");
});

test("an unreachable server says where it looked", async () => {
  const fake = (async () => {
    throw new TypeError("fetch failed");
  }) as unknown as typeof fetch;
  await assert.rejects(new KaizenClient("http://127.0.0.1:9", "t", fake).request("GET", "/v1/models"), /unreachable at http:\/\/127.0.0.1:9/);
});
