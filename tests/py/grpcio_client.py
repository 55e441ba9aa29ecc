"""Drives a Canopy controller with Python's grpcio (Debian's python3-grpcio), as a third-party
client would: server reflection v1alpha, garbage request bytes, an oversized name.

Usage: grpcio_client.py TARGET CA_PEM API_TOKEN. Prints one line per check, "ok NAME" or
"FAIL NAME: why", and exits non-zero if any check failed. Messages are encoded by hand (the
wire format is simple), so no generated code or grpcio-tools is needed.
"""
import sys

import grpc


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field_bytes(num, data):
    return varint(num << 3 | 2) + varint(len(data)) + data


def main():
    target, ca_path, token = sys.argv[1:4]
    with open(ca_path, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    ch = grpc.secure_channel(target, creds)
    auth = (("authorization", "Bearer " + token),)
    failed = 0

    def check(name, ok, why=""):
        nonlocal failed
        print(("ok " if ok else "FAIL ") + name + ("" if ok else ": " + why))
        failed += 0 if ok else 1

    # Reflection v1alpha (what grpcio-reflection's client speaks): list the services.
    ident = lambda b: b
    refl = ch.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=ident,
        response_deserializer=ident,
    )
    try:
        answers = list(refl(iter([field_bytes(7, b"")]), timeout=10))
        body = b"".join(answers)
        check("reflection v1alpha lists ConsoleService", b"canopy.v1.ConsoleService" in body,
              repr(body[:200]))
    except grpc.RpcError as e:
        check("reflection v1alpha lists ConsoleService", False, f"{e.code()} {e.details()}")

    # Bytes that are no protobuf message: the client's fault.
    list_networks = ch.unary_unary(
        "/canopy.v1.ConsoleService/ListNetworks", request_serializer=ident,
        response_deserializer=ident)
    try:
        list_networks(b"\xff\xff\xff\xff", metadata=auth, timeout=10)
        check("garbage bytes are InvalidArgument", False, "accepted")
    except grpc.RpcError as e:
        check("garbage bytes are InvalidArgument",
              e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{e.code()} {e.details()}")

    # A 20 KB network name: refused with a short message this client can read.
    create = ch.unary_unary(
        "/canopy.v1.ConsoleService/CreateNetwork", request_serializer=ident,
        response_deserializer=ident)
    req = field_bytes(1, b"x" * 20000) + field_bytes(2, b"100.64.0.0/24")
    try:
        create(req, metadata=auth, timeout=10)
        check("a 20 KB name is refused", False, "accepted")
    except grpc.RpcError as e:
        details = e.details() or ""
        check("a 20 KB name is refused with a short message",
              e.code() == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 1024,
              f"{e.code()} ({len(details)} bytes)")
    sys.exit(1 if failed else 0)


main()
