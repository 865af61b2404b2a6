#!/usr/bin/env python3
"""Send ONE Web Push message with pywebpush: an independent sender for the
push-relay end-to-end tests.

Prints one JSON line on stdout:
  {"status": int, "headers": {...response headers...}, "body": "...",
   "request_headers": {...headers pywebpush sent...}}

Exit codes: 0 = got an HTTP answer (any status), 2 = bad arguments,
3 = pywebpush is not installed, 4 = the request could not be made.

What pywebpush (2.x, py_vapid's Vapid02) puts on the wire:
  * aes128gcm: `Content-Encoding: aes128gcm`, `ttl: N`,
    `Authorization: vapid t=<jwt>,k=<key>` (no space after the comma);
    salt and sender key inside the body; no Content-Type.
  * aesgcm: `Content-Encoding: aesgcm`, `encryption: salt=<b64url>`,
    `crypto-key: dh=<b64url>` (VAPID02 adds no p256ecdsa there: the key is in
    the Authorization header), `ttl: N`, `Authorization: vapid t=<jwt>,k=<key>`.
  * the JWT's `aud` is `scheme://netloc` of the endpoint, `exp` now + 12 h,
    `sub` from the claims (must look like mailto:x@y.z or https://...).
"""
import argparse
import json
import sys

try:
    from pywebpush import webpush, WebPushException
except ImportError as exc:  # pragma: no cover
    print(f"pywebpush is not installed ({exc}); run: pip install pywebpush", file=sys.stderr)
    sys.exit(3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--p256dh", required=True, help="subscription key, base64 (any alphabet)")
    p.add_argument("--auth", required=True, help="auth secret, base64 (any alphabet)")
    p.add_argument("--payload", required=True, help="plaintext (UTF-8)")
    p.add_argument("--encoding", choices=["aes128gcm", "aesgcm"], default="aes128gcm")
    p.add_argument("--ttl", type=int, default=60)
    p.add_argument("--vapid-key", required=True, help="PEM file path or raw base64url private key")
    p.add_argument("--sub", default="mailto:test@example.org")
    p.add_argument("--header", action="append", default=[], help="extra header 'Name: value'")
    a = p.parse_args()

    def urlsafe(s: str) -> str:
        return s.replace("+", "-").replace("/", "_").rstrip("=")

    headers = {}
    for h in a.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()

    sub_info = {"endpoint": a.endpoint, "keys": {"p256dh": urlsafe(a.p256dh), "auth": urlsafe(a.auth)}}
    try:
        resp = webpush(
            subscription_info=sub_info,
            data=a.payload,
            vapid_private_key=a.vapid_key,
            vapid_claims={"sub": a.sub},
            content_encoding=a.encoding,
            ttl=a.ttl,
            headers=headers,
            timeout=30,
        )
    except WebPushException as exc:
        resp = exc.response
        if resp is None:
            print(f"request failed: {exc}", file=sys.stderr)
            return 4
    except Exception as exc:  # connection refused etc.
        print(f"request failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 4

    out = {
        "status": resp.status_code,
        "headers": dict(resp.headers),
        "body": resp.text,
        "request_headers": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in resp.request.headers.items()},
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
