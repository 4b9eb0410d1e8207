"""Breaking-change check of the contracts (docs/architecture.md, "Contracts").

    python scripts/protos_breaking.py check               # protos/ against the baseline and the last release tag
    python scripts/protos_breaking.py check --against REF # protos/ against the protos of a git commit or tag
    python scripts/protos_breaking.py freeze              # write the baseline from protos/ (a release)

The baseline, `protos/baseline.json`, is a summary of every message field,
enum value and RPC of `rbee.v1` as released. Against it, `check` allows only
additions: a new message, field, enum value, service or RPC. It refuses a
field removed (unless its number is now reserved), renumbered, retyped,
renamed or given another label; an enum value removed or renamed; a message,
enum, service or RPC removed; an RPC's request, response or streaming changed.
Exit status 1 lists every such change.

`check` also compares with the protos of the last release tag (the newest tag
named `v*` reachable from HEAD), when the checkout has one: a baseline edited
by hand cannot hide a break from the released contracts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BASELINE = PROTOS / "baseline.json"
F = descriptor_pb2.FieldDescriptorProto


def descriptor_set(protos: Path) -> descriptor_pb2.FileDescriptorSet:
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{protos}", f"--descriptor_set_out={out}", *files],
            check=True,
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _field(field: descriptor_pb2.FieldDescriptorProto) -> dict:
    return {
        "name": field.name,
        "type": F.Type.Name(field.type),
        "type_name": field.type_name,
        "label": F.Label.Name(field.label),
        "oneof": field.oneof_index if field.HasField("oneof_index") else None,
    }


def _message(prefix: str, msg: descriptor_pb2.DescriptorProto, out: dict) -> None:
    name = f"{prefix}.{msg.name}"
    reserved = sorted({n for r in msg.reserved_range for n in range(r.start, r.end)})
    out["messages"][name] = {"fields": {str(f.number): _field(f) for f in msg.field}, "reserved": reserved}
    for nested in msg.nested_type:
        if not nested.options.map_entry:
            _message(name, nested, out)
    for enum in msg.enum_type:
        _enum(name, enum, out)


def _enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto, out: dict) -> None:
    out["enums"][f"{prefix}.{enum.name}"] = {str(v.number): v.name for v in enum.value}


def summary(fds: descriptor_pb2.FileDescriptorSet) -> dict:
    out: dict = {"messages": {}, "enums": {}, "services": {}}
    for file in fds.file:
        prefix = file.package
        for msg in file.message_type:
            _message(prefix, msg, out)
        for enum in file.enum_type:
            _enum(prefix, enum, out)
        for service in file.service:
            out["services"][f"{prefix}.{service.name}"] = {
                m.name: {
                    "input": m.input_type,
                    "output": m.output_type,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in service.method
            }
    return out


def breaking_changes(old: dict, new: dict) -> list[str]:
    problems: list[str] = []
    for name, msg in old["messages"].items():
        now = new["messages"].get(name)
        if now is None:
            problems.append(f"message {name} was removed")
            continue
        for number, field in msg["fields"].items():
            current = now["fields"].get(number)
            if current is None:
                if int(number) not in now["reserved"]:
                    problems.append(f"{name}: field {field['name']} = {number} was removed without reserving {number}")
                continue
            for key in ("name", "type", "type_name", "label"):
                if current[key] != field[key]:
                    problems.append(f"{name}: field {number} changed its {key} from {field[key]!r} to {current[key]!r}")
            if (field["oneof"] is None) != (current["oneof"] is None):
                problems.append(f"{name}: field {field['name']} = {number} moved into or out of a oneof")
    for name, values in old["enums"].items():
        now = new["enums"].get(name)
        if now is None:
            problems.append(f"enum {name} was removed")
            continue
        for number, value in values.items():
            if now.get(number) != value:
                problems.append(f"enum {name}: value {number} ({value}) was removed or renamed")
    for name, methods in old["services"].items():
        now = new["services"].get(name)
        if now is None:
            problems.append(f"service {name} was removed")
            continue
        for method, shape in methods.items():
            current = now.get(method)
            if current is None:
                problems.append(f"rpc {name}.{method} was removed")
            elif current != shape:
                changed = ", ".join(k for k in shape if shape[k] != current[k])
                problems.append(f"rpc {name}.{method} changed its {changed}")
    return problems


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def last_release_tag(root: Path = ROOT) -> str | None:
    """The newest `v*` tag reachable from HEAD, or None (no git, no tags)."""
    try:
        run = _git(root, "describe", "--tags", "--abbrev=0", "--match", "v*", "HEAD")
    except FileNotFoundError:
        return None
    return run.stdout.strip() if run.returncode == 0 and run.stdout.strip() else None


def protos_at(ref: str, scratch: Path, root: Path = ROOT) -> Path:
    """The protos/ folder of a git commit or tag, written under scratch."""
    listing = _git(root, "ls-tree", "-r", "--name-only", ref, "--", "protos")
    if listing.returncode != 0:
        raise SystemExit(f"protos-check: no such git revision {ref!r}: {listing.stderr.strip()}")
    names = [n for n in listing.stdout.splitlines() if n.endswith(".proto")]
    if not names:
        raise SystemExit(f"protos-check: {ref} has no .proto files under protos/")
    for name in names:
        body = _git(root, "show", f"{ref}:{name}")
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body.stdout)
    return scratch / "protos"


def report(problems: list[str], against: str) -> int:
    for problem in problems:
        print(f"protos-check: breaking change against {against}: {problem}", file=sys.stderr)
    if problems:
        print("protos-check: v1 changes only by addition; add a new field or RPC instead", file=sys.stderr)
        return 1
    print(f"protos-check: no breaking change against {against}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["freeze"]:
        # freeze [PROTOS_DIR]: another tree of protos (e.g. a release's, unpacked).
        source = Path(argv[1]) if len(argv) > 1 else PROTOS
        BASELINE.write_text(json.dumps(summary(descriptor_set(source)), indent=1, sort_keys=True) + "\n")
        print(f"protos-check: baseline written to {BASELINE.relative_to(ROOT)}")
        return 0
    if argv[:1] != ["check"]:
        print(__doc__, file=sys.stderr)
        return 2
    current = summary(descriptor_set(PROTOS))
    if argv[1:2] == ["--against"] and len(argv) == 3:
        with tempfile.TemporaryDirectory() as scratch:
            return report(breaking_changes(summary(descriptor_set(protos_at(argv[2], Path(scratch)))), current), argv[2])
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    if not BASELINE.is_file():
        print(f"protos-check: no baseline at {BASELINE.relative_to(ROOT)}; run 'make protos-freeze' at a release", file=sys.stderr)
        return 1
    status = report(breaking_changes(json.loads(BASELINE.read_text()), current), f"the baseline ({BASELINE.relative_to(ROOT)})")
    tag = last_release_tag()
    if tag is None:
        print("protos-check: no release tag (v*) in this checkout: checked against the baseline only")
        return status
    with tempfile.TemporaryDirectory() as scratch:
        return report(breaking_changes(summary(descriptor_set(protos_at(tag, Path(scratch)))), current), f"release {tag}") or status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
