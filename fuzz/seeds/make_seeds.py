#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets (fuzz/seeds/<target>/) and the RS256 tokens the
`jwks` target verifies (fuzz/seeds/rs256_tokens.txt). Tokens expire in 2100; RS256 ones are
signed with the test suite's keys (tests/fixtures, test-only) through `openssl`.

Run from anywhere: python3 fuzz/seeds/make_seeds.py
"""
import base64
import hashlib
import hmac
import json
import pathlib
import shutil
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
FIXTURES = HERE.parent.parent / "tests" / "fixtures"
SECRET = b"fuzz-secret"  # fuzz/src/lib.rs SECRET
EXP = 4102444800  # 2100-01-01
SEP = b"\xff"  # field separator of the field-based targets (fuzz/src/lib.rs `fields`)


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def js(v) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


def hs256(header: dict, claims: dict, secret: bytes = SECRET) -> str:
    signing = f"{b64(js(header))}.{b64(js(claims))}"
    sig = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(sig)}"


def rs256(key: str, header: dict, claims: dict) -> str:
    signing = f"{b64(js(header))}.{b64(js(claims))}"
    sig = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(FIXTURES / key)],
        input=signing.encode(), capture_output=True, check=True,
    ).stdout
    return f"{signing}.{b64(sig)}"


def write(target: str, seeds: dict) -> None:
    d = HERE / target
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    for name, data in seeds.items():
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


CLAIMS = {
    "sub": "alice", "tenantId": "acme", "exp": EXP,
    "permissions": ["ViewMessage", "CreateMessage", "1", "8", "ViewGroup"],
}
CHECKED = dict(CLAIMS, iss="fuzz-issuer", aud=["fuzz-audience", "other"])
HS = {"alg": "HS256", "typ": "JWT"}

rs = [
    rs256("rsa_private.pem", {"alg": "RS256", "kid": "k1"}, CLAIMS),
    rs256("rsa2_private.pem", {"alg": "RS256", "kid": "k2"}, CLAIMS),
    rs256("rsa_private.pem", {"alg": "RS256"}, CLAIMS),
]
(HERE / "rs256_tokens.txt").write_text("\n".join(rs) + "\n")

write("jwt_token", {
    "hs256": hs256(HS, CLAIMS),
    "hs256_checked": hs256(HS, CHECKED),
    "hs256_kid": hs256(dict(HS, kid="k1"), CLAIMS),
    "hs256_expired": hs256(HS, dict(CLAIMS, exp=1)),
    "hs256_wrong_secret": hs256(HS, CLAIMS, b"not-the-secret"),
    "bearer": "Bearer " + hs256(HS, CLAIMS),
    "bearer_lower": "bearer  " + hs256(HS, CLAIMS) + " ",
    "none": f"{b64(js({'alg': 'none'}))}.{b64(js(CLAIMS))}.",
    "rs256_k1": rs[0],
    "rs256_k2": rs[1],
    "rs256_no_kid": rs[2],
    "rs256_as_hs256": hs256({"alg": "HS256", "kid": "k1"}, CLAIMS,
                            (FIXTURES / "rsa_public.pem").read_bytes()),
})

write("jwt_claims", {
    "sub_tenant": js(CLAIMS),
    "checked": js(CHECKED),
    "sourceloop": js({"id": "42", "tenant_id": "t1", "exp": EXP, "permissions": ["1", "2"]}),
    "numeric_ids": js({"sub": 7, "tenantId": 9, "exp": EXP}),
    "nbf": js(dict(CLAIMS, nbf=1700000000, iat=1700000000)),
    "nbf_future": js(dict(CLAIMS, nbf=EXP - 10)),
    "float_exp": js(dict(CLAIMS, exp=EXP + 0.5)),
    "no_sub": js({"exp": EXP}),
    "empty_sub": js({"sub": "", "id": "bob", "exp": EXP}),
    "long_sub": js({"sub": "x" * 256, "exp": EXP}),
    "control_tenant": js({"sub": "a", "tenantId": "a\nb", "exp": EXP}),
    "wrong_types": js({"sub": ["a"], "tenantId": {"x": 1}, "exp": "soon", "permissions": "all"}),
    "expired": js(dict(CLAIMS, exp=1)),
})

write("jwks", {
    "k1": (FIXTURES / "jwks_k1.json").read_bytes(),
    "k1_k2": (FIXTURES / "jwks_k1_k2.json").read_bytes(),
    "oct": js({"keys": [{"kty": "oct", "kid": "k1", "k": b64(SECRET)}]}),
    "rsa_as_hs256": js({"keys": [dict(json.loads((FIXTURES / "jwks_k1.json").read_text())["keys"][0],
                                      alg="HS256")]}),
    "empty": js({"keys": []}),
})

SCOPES = {0: "groups", 1: "messages/0190a8e4-1c2b-7000-8000-000000000001/",
          3: "members/0190a8e4-1c2b-7000-8000-000000000001",
          4: "attachments/0190a8e4-1c2b-7000-8000-000000000001/"}


def page(scope: int, key: str, other: int = 0) -> bytes:
    return bytes([scope | (other << 4)]) + b64(f"{SCOPES[scope]}\n{key}".encode()).encode()


write("page_token", {
    "groups": page(0, "0190a8e4-1c2b-7000-8000-0000000000aa", 1),
    "messages": page(1, "12345", 3),
    "members": page(3, "1700000000000000/alice", 4),
    "members_slash": page(3, "-1/a/b", 0),
    "attachments": page(4, "0190a8e4-1c2b-7000-8000-0000000000bb", 1),
    "other_scope": bytes([3]) + page(1, "7")[1:],
    "padded": bytes([0]) + b64(b"groups\nx").encode() + b"==",
    "empty": b"\x00",
})

write("update_mask", {
    "body": SEP.join([b"body", "new body 👋".encode(), b"", b"", b"", b"", b""]),
    "body_subject_etag": SEP.join([b"body,subject", b"hi", b"subject", b"7", b"", b"", b""]),
    "group_all": SEP.join([b"name,description,channel_type", b"", b"", b"", b"lunch", b"daily", b"team"]),
    "unknown": SEP.join([b"id,sender_id,body.text,", b"x", b"y", b"-1", b"n", b"d", b"t"]),
    "bad_values": SEP.join([b"subject,name", b"", b"nul\x00", b"1.5", b"   ", b"", b""]),
    "no_mask": SEP.join([b"", b"x", b"", b"", b"", b"", b""]),
})

write("attachment_metadata", {
    "ok": SEP.join([b"0190a8e4-1c2b-7000-8000-000000000001", "résumé.pdf".encode(),
                    b"application/pdf", b"1048576", hashlib.sha256(b"").hexdigest().encode()]),
    "defaults": SEP.join([b"0190a8e4-1c2b-7000-8000-000000000001", b"a", b"", b"0", b""]),
    "bad": SEP.join([b"not-a-uuid", b"a\x00b", b"text/plain\r\nx: y", b"-1", b"ABC"]),
    "upper_hex": SEP.join([b"{0190A8E4-1C2B-7000-8000-000000000001}", b"x" * 256, b"t" * 256,
                           b"9223372036854775807", b"A" * 64]),
})

write("cors_origins", {
    "list": b"http://localhost:5173, https://app.example.com",
    "any": b"*",
    "empty": b" , ,",
    "bad": b"https://Example.com/path,http://a:80,https://u@h,*",
    "ipv6": b"http://[::1]:8080",
})
print("seeds written under", HERE)
