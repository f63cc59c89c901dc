#!/usr/bin/env python3
"""A minimal CRI v1 client for Velox's runtime tests (pod sandboxes only).

    cri.py SOCKET run NAME      -> {"id", "ip", "netns"} of the new, ready sandbox
    cri.py SOCKET stop ID       -> StopPodSandbox
    cri.py SOCKET rm ID         -> RemovePodSandbox
    cri.py SOCKET list          -> ids of all sandboxes, one per line

Uses the generated stubs of PyPI's container-runtime-interface-api, which
`cargo xtask setup` installs into target/tools/python (put on PYTHONPATH).
"""
import json
import sys
import uuid

import grpc
from cri_api.v1 import api_pb2 as cri
from cri_api.v1 import api_pb2_grpc


def network_namespace(status):
    info = json.loads(status.info.get("info", "{}"))
    for ns in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return ns.get("path", "")
    return ""


def main():
    socket, command, *args = sys.argv[1:]
    stub = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{socket}"))
    if command == "run":
        name = args[0]
        metadata = cri.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace="default")
        config = cri.PodSandboxConfig(metadata=metadata, hostname=name, linux=cri.LinuxPodSandboxConfig())
        sandbox = stub.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        status = stub.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=sandbox, verbose=True), timeout=60)
        print(json.dumps({"id": sandbox, "ip": status.status.network.ip, "netns": network_namespace(status)}))
    elif command == "stop":
        stub.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=args[0]), timeout=60)
    elif command == "rm":
        stub.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=args[0]), timeout=60)
    elif command == "list":
        for sandbox in stub.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=60).items:
            print(sandbox.id)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
