"""What a hostile local user can reach: run as a script, as another user, by test_access.

Blocking, no reactor.  ``python hostile_client.py JSON`` where JSON holds the paths and
addresses to try (``admin_socket``, ``ipc_socket``, ``viewer_socket``, ``tcp``, ``ca``,
``job``); each is optional.  Prints one JSON object: for every attempt, what happened (a
gRPC status code name, ``EACCES``, ``connected``, and the lines read where a query worked).
"""

from __future__ import annotations

import base64
import errno
import json
import socket
import sys

import grpc

from joblet_persist._proto import persist_pb2 as pb
from joblet_persist._proto import persist_pb2_grpc


def _connect(path: str) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        sock.close()
    return "connected"


def _calls(channel, job: str) -> dict:
    """Try a read and both admin RPCs; the result of each."""
    stub = persist_pb2_grpc.PersistServiceStub(channel)
    found = {}
    try:
        lines = list(stub.QueryLogs(pb.QueryLogsRequest(job_uuid=job), timeout=5))
    except grpc.RpcError as e:
        found["QueryLogs"] = e.code().name
    else:
        found["QueryLogs"] = "OK"
        found["lines"] = [base64.b64encode(line.content).decode() for line in lines]
    for name, call, request in [
        ("DeleteJob", stub.DeleteJob, pb.DeleteJobRequest(job_uuid=job)),
        ("CleanupOldData", stub.CleanupOldData, pb.CleanupRequest()),
    ]:
        try:
            call(request, timeout=5)
        except grpc.RpcError as e:
            found[name] = e.code().name
        else:
            found[name] = "OK"
    return found


def main(spec: dict) -> dict:
    job = spec["job"]
    result = {}
    for key in ("admin_socket", "ipc_socket", "viewer_socket"):
        if spec.get(key):
            result[key + "_connect"] = _connect(spec[key])
    for key in ("admin_socket", "viewer_socket"):
        if spec.get(key):
            with grpc.insecure_channel(f"unix:{spec[key]}") as channel:
                result[key] = _calls(channel, job)
    if spec.get("tcp"):
        with grpc.insecure_channel(spec["tcp"]) as channel:
            result["tcp_plaintext"] = _calls(channel, job)
        creds = grpc.ssl_channel_credentials(spec["ca"].encode())
        with grpc.secure_channel(spec["tcp"], creds) as channel:
            result["tcp_tls_without_certificate"] = _calls(channel, job)
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
