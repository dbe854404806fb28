"""Calls a microcs service over NATS with nats-py (a client we did not write) and checks the
$SRV.PING / $SRV.INFO / $SRV.STATS answers against the io.nats.micro.v1 schemas.

Usage: python call_microcs.py NATS_URL SERVICE_NAME
The service must be the one started by the Rust test: default handler echoes, method `upper`
upper-cases, method `fail` fails with code 422 and message "no good". Exit 0 when every check
passes, 1 (with the reason) otherwise.
"""

import asyncio
import json
import re
import sys
from datetime import datetime

import nats

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# SemVer 2.0, as the schemas' pattern.
SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)

REQUIRED = {
    "ping": ["type", "name", "id", "version"],
    "info": ["type", "name", "id", "version", "description"],
    "stats": ["type", "name", "id", "version", "started", "endpoints"],
}
REQUIRED_ENDPOINT = {
    "info": ["name", "subject"],
    "stats": [
        "name",
        "subject",
        "num_requests",
        "num_errors",
        "last_error",
        "processing_time",
        "average_processing_time",
    ],
}


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def check_metadata(md, where):
    check(md is None or isinstance(md, dict), f"{where}: metadata must be an object or null")
    for k, v in (md or {}).items():
        check(isinstance(k, str) and isinstance(v, str), f"{where}: metadata {k!r} must be a string")


def check_common(doc, kind, name, where):
    for field in REQUIRED[kind]:
        check(field in doc, f"{where}: required field {field!r} is missing: {doc}")
    check(doc["type"] == f"io.nats.micro.v1.{kind}_response", f"{where}: type is {doc['type']!r}")
    check(isinstance(doc["name"], str) and NAME_RE.match(doc["name"]), f"{where}: bad name {doc['name']!r}")
    check(doc["name"] == name, f"{where}: name {doc['name']!r}, expected {name!r}")
    check(isinstance(doc["id"], str) and len(doc["id"]) >= 1, f"{where}: id must be a non-empty string")
    check(isinstance(doc["version"], str) and SEMVER_RE.match(doc["version"]), f"{where}: version not SemVer")
    check_metadata(doc.get("metadata"), where)
    md = doc.get("metadata") or {}
    check("host" in md and "pid" in md, f"{where}: metadata lacks host and pid: {md}")


def check_endpoints(doc, kind, where):
    eps = doc.get("endpoints")
    check(isinstance(eps, list) and eps, f"{where}: endpoints must be a non-empty array")
    for ep in eps:
        for field in REQUIRED_ENDPOINT[kind]:
            check(field in ep, f"{where}: endpoint field {field!r} is missing: {ep}")
        check(NAME_RE.match(ep["name"]), f"{where}: endpoint name {ep['name']!r} breaks the pattern")
        check(isinstance(ep["subject"], str) and ep["subject"], f"{where}: endpoint subject empty")
        if "metadata" in ep:
            check_metadata(ep["metadata"], where)
        if kind == "stats":
            for n in ["num_requests", "num_errors", "processing_time", "average_processing_time"]:
                check(isinstance(ep[n], int) and not isinstance(ep[n], bool), f"{where}: {n} must be an integer")
            check(isinstance(ep["last_error"], str), f"{where}: last_error must be a string")
            if "data" in ep:
                check(isinstance(ep["data"], dict), f"{where}: data must be an object when present")
    return eps


async def main(url, name):
    nc = await nats.connect(url)
    try:
        # Plain request/reply on the service's subject and a method's subject.
        msg = await nc.request(name, b"Give me some data back!!", timeout=5)
        check(msg.data == b"Give me some data back!!", f"echo answered {msg.data!r}")
        msg = await nc.request(f"{name}.upper", b"abc", timeout=5)
        check(msg.data == b"ABC", f"upper answered {msg.data!r}")
        # A handler error: NATS micro's error headers.
        msg = await nc.request(f"{name}.fail", b"", timeout=5)
        hdr = msg.headers or {}
        check(hdr.get("Nats-Service-Error-Code") == "422", f"error code header: {hdr}")
        check(hdr.get("Nats-Service-Error") == "no good", f"error header: {hdr}")

        # $SRV at all three levels.
        ping = json.loads((await nc.request(f"$SRV.PING.{name}", b"", timeout=5)).data)
        check_common(ping, "ping", name, "$SRV.PING.NAME")
        sid = ping["id"]
        for kind in ["ping", "info", "stats"]:
            verb = kind.upper()
            for subject in [f"$SRV.{verb}.{name}", f"$SRV.{verb}.{name}.{sid}"]:
                doc = json.loads((await nc.request(subject, b"", timeout=5)).data)
                check_common(doc, kind, name, subject)
                check(doc["id"] == sid, f"{subject}: another instance answered")
            # $SRV.VERB reaches every service: gather answers for a moment, find ours.
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(f"$SRV.{verb}", b"", reply=inbox)
            ours = None
            try:
                while ours is None:
                    m = await sub.next_msg(timeout=3)
                    doc = json.loads(m.data)
                    check(doc.get("type") == f"io.nats.micro.v1.{kind}_response", f"$SRV.{verb}: {doc}")
                    if doc.get("id") == sid:
                        ours = doc
            finally:
                await sub.unsubscribe()
            check_common(ours, kind, name, f"$SRV.{verb}")

        info = json.loads((await nc.request(f"$SRV.INFO.{name}", b"", timeout=5)).data)
        check(isinstance(info["description"], str), "info: description must be a string")
        eps = check_endpoints(info, "info", "$SRV.INFO")
        subjects = {e["name"]: e["subject"] for e in eps}
        check(subjects.get("default") == name, f"default endpoint subject: {subjects}")
        check(subjects.get("upper") == f"{name}.upper", f"upper endpoint subject: {subjects}")
        check(all(e.get("queue_group") == "q" for e in eps), f"queue groups: {eps}")

        stats = json.loads((await nc.request(f"$SRV.STATS.{name}", b"", timeout=5)).data)
        started = stats["started"]
        check(isinstance(started, str), "stats: started must be a string")
        datetime.fromisoformat(started.replace("Z", "+00:00")[:26] + "+00:00")
        eps = {e["name"]: e for e in check_endpoints(stats, "stats", "$SRV.STATS")}
        check(eps["default"]["num_requests"] >= 1, f"default requests: {eps['default']}")
        check(eps["upper"]["num_requests"] >= 1, f"upper requests: {eps['upper']}")
        check(eps["fail"]["num_errors"] >= 1 and eps["fail"]["last_error"] == "no good", f"fail: {eps['fail']}")
    finally:
        await nc.close()
    print("interop ok: nats-py called the service and the $SRV answers match the schemas")


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
    except AssertionError as e:
        print(f"interop check failed: {e}", file=sys.stderr)
        sys.exit(1)
